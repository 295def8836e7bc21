//! The load generator of `keyhole bench` and of `cargo bench --bench
//! compare`, in the spirit of `redis-benchmark`.
//!
//! Each connection speaks the wire protocol directly ([`crate::transport`],
//! [`crate::handshake`]), not through [`crate::client::HubClient`]: requests
//! are copied from a pre-encoded template with the id patched in, a window
//! of them is written with one `write`, and replies are checked byte for
//! byte against the expected frame. That keeps the load generator, which
//! shares the cores with the daemon, far cheaper per request than the
//! library client (a channel message and a oneshot per request); measured
//! with `-c 1 -P 64`, the library client needs several times the CPU per
//! ping. The client runtime is single-threaded for the same reason.
//!
//! Every reply is verified: request id (replies come in request order),
//! type and every byte of the payload; every event is verified at every
//! subscriber: topic, payload bytes, contiguous sequence numbers and the
//! publish index carried in the payload. A lost, reordered or corrupted
//! message fails the run with a non-zero exit, and so does a run that stops
//! making progress for `--timeout` seconds.
//!
//! The engine is generic over [`Wire`] (and [`PubSub`], [`ReqRep`]), so
//! `benches/compare.rs` drives the daemon, a raw echo server, Redis and NATS
//! with this same code; [`request_reply`] relays requests between two
//! clients through the server ([`KeyholeRr`] for the hub).
#![allow(missing_docs)]

use std::future::Future;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::client::{ClientError, ConnectOptions, check_peer_uid, connect_socket, handshake};
use crate::encoding::Payload;
use crate::handshake::HandshakeFrame;
use crate::hub::{HubEvent, HubReply, HubRequest, Outcome};
use crate::limits::{LENGTH_PREFIX_LEN, MAX_FRAME_LEN};
use crate::token::SessionToken;
use crate::token_file::current_uid;
use crate::transport::{
    DaemonFrame, EncodedEvent, RequestKind, encode_ack, encode_reply, encode_request,
};

/// Largest `-c` / `-S`: the bench is bounded in connections.
pub const MAX_CONNECTIONS: usize = 1024;
/// Largest `-P`.
pub const MAX_PIPELINE: usize = 4096;
/// Longest `--duration`, seconds.
pub const MAX_DURATION_SECS: f64 = 3600.0;
/// Payload of the `large` workload.
pub const LARGE_PAYLOAD: usize = 1 << 20;
/// Bytes at the start of a fan-out payload: publish index and send time.
pub const PAYLOAD_HEADER: usize = 16;

/// Workloads of `keyhole bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Ping/Pong round trips on -c connections, -P in flight on each
    Ping,
    /// Publish (--payload bytes) on a topic nobody subscribes to; -c, -P as ping
    Publish,
    /// One publisher, -S subscribers; -P publishes in flight (until every subscriber has the event); deliveries/s
    Fanout,
    /// Sequential connect + handshake + ping + close
    Connect,
    /// 1 MiB publishes to one subscriber, -P in flight (until delivered); bytes/s
    Large,
}

impl Workload {
    const ALL: [Workload; 5] = [
        Workload::Ping,
        Workload::Publish,
        Workload::Fanout,
        Workload::Connect,
        Workload::Large,
    ];

    fn name(self) -> &'static str {
        match self {
            Workload::Ping => "ping",
            Workload::Publish => "publish",
            Workload::Fanout => "fanout",
            Workload::Connect => "connect",
            Workload::Large => "large",
        }
    }
}

/// `keyhole bench` options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Workloads to run, in this order [default: all]
    #[arg(value_enum)]
    pub workloads: Vec<Workload>,
    /// Connections (ping, publish)
    #[arg(short = 'c', long, value_name = "N", default_value_t = 50)]
    pub connections: usize,
    /// Requests in flight per connection (fanout, large: publishes in flight until delivered)
    #[arg(short = 'P', long, value_name = "N", default_value_t = 1)]
    pub pipeline: usize,
    /// Requests per workload (fanout, large: publishes; connect: cycles) [default: run for --duration]
    #[arg(short = 'n', long, value_name = "N")]
    pub requests: Option<u64>,
    /// Seconds per workload [default: 5, or 1 with --quick]
    #[arg(long, value_name = "SECS", conflicts_with = "requests")]
    pub duration: Option<f64>,
    /// Payload bytes of publish and fanout (at least 16: index and send time)
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub payload: usize,
    /// Subscribers of fanout
    #[arg(short = 'S', long, value_name = "N", default_value_t = 16)]
    pub subscribers: usize,
    /// Short runs (1 s per workload unless --duration or -n says otherwise)
    #[arg(long)]
    pub quick: bool,
    /// connect: send the ping in the handshake's write, as the library
    /// client does, instead of waiting for Welcome first
    #[arg(long)]
    pub pipelined: bool,
    /// ping, publish: send the next -P requests only once every request in
    /// flight is answered, so that each write carries exactly -P (the
    /// daemon's work per request then does not depend on timing:
    /// `.ci/callgrind.sh` counts instructions this way)
    #[arg(long)]
    pub burst: bool,
    /// Print one JSON object with every figure of the report instead of the
    /// report (field names in the README)
    #[arg(long)]
    pub json: bool,
}

/// One workload's figures in `keyhole bench --json` (the README's table of
/// field names describes each). Options a workload does not use are `null`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadReport {
    pub workload: &'static str,
    /// The shape line of the text report.
    pub shape: String,
    pub connections: Option<usize>,
    pub in_flight: Option<usize>,
    pub payload_bytes: Option<usize>,
    pub subscribers: Option<usize>,
    /// What `ops` counts: requests, deliveries or cycles.
    pub unit: &'static str,
    pub ops: u64,
    pub elapsed_s: f64,
    pub ops_per_s: f64,
    /// Payload bytes delivered (fanout, large; 0 otherwise).
    pub bytes: u64,
    pub bytes_per_s: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

/// `keyhole bench --json`: every workload run, in order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub workloads: Vec<WorkloadReport>,
}

/// Why a benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Connecting or authenticating failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A reply or event was missing, out of order or not what was sent.
    #[error("verification failed: {0}")]
    Verify(String),
    /// The socket failed mid-run.
    #[error("i/o error on a benchmark connection")]
    Io(#[from] std::io::Error),
    /// No progress for the timeout.
    #[error("no progress for {0:?}: replies or events were lost")]
    Stalled(Duration),
    /// Bad options.
    #[error("{0}")]
    Usage(String),
}

impl BenchError {
    /// Exit code of `keyhole bench` for errors other than [`Self::Client`]:
    /// 2 bad usage, 7 the connection failed (as for every subcommand), 1 a
    /// failed verification (a reply or event lost, reordered or corrupted,
    /// or no progress for the timeout).
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Usage(_) => 2,
            BenchError::Io(_) => 7,
            BenchError::Client(_) | BenchError::Verify(_) | BenchError::Stalled(_) => 1,
        }
    }
}

fn verify<T>(what: impl Into<String>) -> Result<T, BenchError> {
    Err(BenchError::Verify(what.into()))
}

// ---------------------------------------------------------------------------
// Latency histogram

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
const MAX_EXP: u32 = 42;
const BUCKETS: usize = 2 * SUB + (MAX_EXP as usize - SUB_BITS as usize) * SUB;

/// Log-linear histogram of nanoseconds, about 3% resolution.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

impl Histogram {
    fn bucket(v: u64) -> usize {
        if v < (2 * SUB) as u64 {
            return v as usize;
        }
        let exp = (63 - v.leading_zeros()).min(MAX_EXP);
        let mantissa = ((v >> (exp - SUB_BITS)) as usize) & (SUB - 1);
        2 * SUB + (exp - SUB_BITS - 1) as usize * SUB + mantissa
    }

    fn lower(bucket: usize) -> u64 {
        if bucket < 2 * SUB {
            return bucket as u64;
        }
        let exp = (bucket - 2 * SUB) / SUB + SUB_BITS as usize + 1;
        let mantissa = ((bucket - 2 * SUB) % SUB) as u64;
        (1u64 << exp) + (mantissa << (exp - SUB_BITS as usize))
    }

    /// Records `n` samples of `v` ns.
    #[inline]
    pub fn record_n(&mut self, v: u64, n: u64) {
        let b = Self::bucket(v).min(BUCKETS - 1);
        self.counts[b] += n;
        self.total += n;
        self.max = self.max.max(v);
    }

    /// Adds another histogram.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The `q` quantile (0..=1) in ns (middle of its bucket).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let lo = Self::lower(i);
                let hi = Self::lower(i + 1);
                return (lo + (hi - lo) / 2).min(self.max);
            }
        }
        self.max
    }

    /// Largest sample.
    pub fn max(&self) -> u64 {
        self.max
    }
}

// ---------------------------------------------------------------------------
// The protocol a load generator speaks

/// What the engine needs from a protocol. `request`/`reply` drive the
/// request/response workloads; [`PubSub`] drives publish/subscribe and
/// [`ReqRep`] request/reply between two clients through the server.
pub trait Wire: Send + Sync + 'static {
    /// The connection: a Unix socket for keyhole, the raw echo server and
    /// Redis; loopback TCP for NATS, which has no Unix-socket listener.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Connects and does what a new connection needs before requests
    /// (keyhole: peer check, handshake, `Welcome`).
    fn open(&self) -> impl Future<Output = Result<Self::Stream, BenchError>> + Send;
    /// Like [`Self::open`], with `first` sent in the same write as the
    /// opening (keyhole: right behind the handshake, which section 4 of
    /// proto-spec.md allows), so that opening and first request take one
    /// round trip. Returns what was read past the opening's answer.
    fn open_pipelined(
        &self,
        first: &[u8],
    ) -> impl Future<Output = Result<(Self::Stream, BytesMut), BenchError>> + Send;
    /// Appends the request with this id.
    fn request(&self, id: u64, out: &mut BytesMut);
    /// If the whole reply to request `id` is at the front of `buf`, checks
    /// every byte of it and removes it (`Ok(true)`); `Ok(false)`: incomplete.
    fn reply(&self, id: u64, buf: &mut BytesMut) -> Result<bool, BenchError>;
    /// If a whole message the server sends on its own (NATS: `PING`, which
    /// must be answered or the server drops the client) is at the front of
    /// `buf`: its length and what to answer. Checked before every reply and
    /// event; an error message from the server may fail the run here.
    #[inline]
    fn control(&self, _buf: &[u8]) -> Result<Option<(usize, &'static [u8])>, BenchError> {
        Ok(None)
    }
}

/// Publish/subscribe on one topic (fixed in the value).
pub trait PubSub: Wire {
    /// Subscribes on `stream` and waits until the subscription is in place.
    fn subscribe(
        &self,
        stream: &mut Self::Stream,
    ) -> impl Future<Output = Result<(), BenchError>> + Send;
    /// Appends publish number `id` (ids count from 1) of `payload`.
    fn publish(&self, id: u64, payload: &[u8], out: &mut BytesMut);
    /// Whether the server answers every publish (keyhole: `Published`;
    /// Redis: the receiver count). NATS does not (`verbose: false`): its
    /// publisher's window is only the deliveries, as for the others.
    #[inline]
    fn acks_publish(&self) -> bool {
        true
    }
    /// Like [`Wire::reply`] for the acknowledgement of publish `id`.
    fn ack(&self, id: u64, buf: &mut BytesMut) -> Result<bool, BenchError>;
    /// If a whole event is at the front of `buf`, checks its framing and
    /// topic and returns its length, its sequence number (if the protocol
    /// has one) and where its payload is in `buf`; the caller checks the
    /// payload and then advances `buf` by the length.
    fn event(&self, buf: &[u8]) -> Result<Option<EventAt>, BenchError>;
}

/// Where an event is at the front of a read buffer.
#[derive(Debug, Clone, Copy)]
pub struct EventAt {
    /// Bytes of the whole event on the wire.
    pub len: usize,
    /// The per-topic sequence number, if the protocol has one.
    pub sequence: Option<u64>,
    /// Offset of the payload.
    pub payload_at: usize,
}

/// Request/reply between two clients through the server: a responder
/// connection serves a name, a requester connection sends requests to it and
/// gets the responder's answers back (client -> server -> responder ->
/// server -> client).
pub trait ReqRep: Wire {
    /// Makes `stream` the responder (keyhole: `Serve`; NATS: `SUB` on the
    /// service subject) and waits until that is in place.
    fn serve(
        &self,
        stream: &mut Self::Stream,
    ) -> impl Future<Output = Result<(), BenchError>> + Send;
    /// Makes `stream` ready to send requests and get their answers (NATS:
    /// `SUB` on the reply inbox; keyhole: nothing) and waits until it is.
    fn prepare_requester(
        &self,
        stream: &mut Self::Stream,
    ) -> impl Future<Output = Result<(), BenchError>> + Send;
    /// Whether the server acknowledges every request to the requester and
    /// every answer to the responder (keyhole: `Requested`, `Responded`;
    /// NATS: no).
    fn acknowledged(&self) -> bool;
    /// Appends request `id` (ids count from 1) carrying `payload`.
    fn send_request(&self, id: u64, payload: &[u8], out: &mut BytesMut);
    /// What is whole at the front of the requester's read buffer, its
    /// framing checked (the caller checks the ids and the payload).
    fn requester_item(&self, buf: &[u8]) -> Result<Option<RequesterItem>, BenchError>;
    /// What is whole at the front of the responder's read buffer, its
    /// framing checked; a request is answered at once by appending the
    /// answer (its payload the request's, byte for byte; keyhole: a call
    /// with id `answer_id`) to `out`.
    fn responder_item(
        &self,
        buf: &[u8],
        answer_id: u64,
        out: &mut BytesMut,
    ) -> Result<Option<ResponderItem>, BenchError>;
}

/// A message at the front of the requester's read buffer.
#[derive(Debug, Clone, Copy)]
pub enum RequesterItem {
    /// The server took request `id` (keyhole: `Requested`).
    Accepted { len: usize, id: u64 },
    /// The answer to request `id`; its payload starts at `payload_at`.
    Response {
        len: usize,
        id: u64,
        payload_at: usize,
    },
}

/// A message at the front of the responder's read buffer.
#[derive(Debug, Clone, Copy)]
pub enum ResponderItem {
    /// A request, answered.
    Answered { len: usize },
    /// The server took answer `id` (keyhole: `Responded { delivered: true }`).
    Acked { len: usize, id: u64 },
}

/// Whether a whole frame whose payload is `expect_len` bytes is at the front
/// of `buf`; a frame of another length is reported as what it is.
#[inline]
fn whole_frame(buf: &[u8], expect_len: usize) -> Result<bool, BenchError> {
    if buf.len() < LENGTH_PREFIX_LEN {
        return Ok(false);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return verify(format!("frame length {len} is over the protocol limit"));
    }
    if buf.len() < LENGTH_PREFIX_LEN + len {
        return Ok(false);
    }
    if len != expect_len {
        let payload = Bytes::copy_from_slice(&buf[LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + len]);
        return verify(match DaemonFrame::decode(&payload) {
            Ok(msg) => format!("expected a {expect_len}-byte frame, got {msg:?}"),
            Err(err) => format!("expected a {expect_len}-byte frame, got {len} bytes: {err}"),
        });
    }
    Ok(true)
}

/// A frame payload with an 8-byte id somewhere in it, found by encoding a
/// sentinel through the library's encoder (so the layout comes from the
/// code, not from assumptions here).
#[derive(Debug, Clone)]
pub struct Template {
    /// Frame payload (no prefix).
    pub payload: Vec<u8>,
    /// Offset of the id in `payload`.
    pub id_at: usize,
}

const SENTINEL: u64 = 0xa5c3_5a3c_9617_e8d1;

/// The subscription id a benchmark subscriber uses.
const SUBSCRIPTION: u64 = 1;

impl Template {
    /// The frame `make` appends for an id.
    pub fn of(make: impl Fn(u64, &mut BytesMut)) -> Template {
        let mut buf = BytesMut::new();
        make(SENTINEL, &mut buf);
        let payload = buf[LENGTH_PREFIX_LEN..].to_vec();
        let id_at = payload
            .windows(8)
            .position(|w| w == SENTINEL.to_le_bytes())
            .expect("id present in the encoded template");
        Template { payload, id_at }
    }

    /// Appends the whole frame with `id`.
    #[inline]
    pub fn put(&self, id: u64, out: &mut BytesMut) {
        out.reserve(LENGTH_PREFIX_LEN + self.payload.len());
        out.put_u32_le(self.payload.len() as u32);
        let at = out.len() + self.id_at;
        out.extend_from_slice(&self.payload);
        out[at..at + 8].copy_from_slice(&id.to_le_bytes());
    }

    /// Checks and removes the frame with `id` at the front of `buf`.
    #[inline]
    pub fn take(&self, id: u64, buf: &mut BytesMut, what: &str) -> Result<bool, BenchError> {
        let len = self.payload.len();
        if !whole_frame(buf, len)? {
            return Ok(false);
        }
        let frame = &buf[LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + len];
        let got = u64::from_le_bytes(frame[self.id_at..self.id_at + 8].try_into().expect("8"));
        if got != id {
            return verify(format!("{what}: reply for id {got}, expected id {id}"));
        }
        if frame[..self.id_at] != self.payload[..self.id_at]
            || frame[self.id_at + 8..] != self.payload[self.id_at + 8..]
        {
            return verify(format!(
                "{what}: reply to id {id} is not the expected frame: {:?}",
                DaemonFrame::decode(&Bytes::copy_from_slice(frame))
            ));
        }
        buf.advance(LENGTH_PREFIX_LEN + len);
        Ok(true)
    }

    /// [`Self::take`] for a frame that ends in a `u64` count (the hub's
    /// `Published { receivers }`): any count up to `max` is accepted.
    #[inline]
    pub fn take_counted(
        &self,
        id: u64,
        buf: &mut BytesMut,
        what: &str,
        max: u64,
    ) -> Result<bool, BenchError> {
        let len = self.payload.len();
        if !whole_frame(buf, len)? {
            return Ok(false);
        }
        let frame = &buf[LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + len];
        let count = u64::from_le_bytes(frame[len - 8..].try_into().expect("8"));
        if count > max {
            return verify(format!(
                "{what}: reply to id {id} counts {count} receivers, more than the {max} there are"
            ));
        }
        let got = u64::from_le_bytes(frame[self.id_at..self.id_at + 8].try_into().expect("8"));
        if got != id {
            return verify(format!("{what}: reply for id {got}, expected id {id}"));
        }
        if frame[..self.id_at] != self.payload[..self.id_at]
            || frame[self.id_at + 8..len - 8] != self.payload[self.id_at + 8..len - 8]
        {
            return verify(format!(
                "{what}: reply to id {id} is not the expected frame: {:?}",
                DaemonFrame::decode(&Bytes::copy_from_slice(frame))
            ));
        }
        buf.advance(LENGTH_PREFIX_LEN + len);
        Ok(true)
    }
}

/// Where a keyhole daemon listens and how to authenticate.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Socket path.
    pub socket: PathBuf,
    /// Session token.
    pub token: Arc<SessionToken>,
    /// How long to wait for `Welcome`.
    pub timeout: Duration,
}

impl Daemon {
    /// Connect, check the peer's uid, handshake, `Welcome`: what every
    /// keyhole client does.
    pub async fn open(&self) -> Result<UnixStream, BenchError> {
        let mut stream = connect_socket(&self.socket).await?;
        check_peer_uid(&stream, &self.socket, current_uid())?;
        handshake(&mut stream, &self.token, self.timeout).await?;
        Ok(stream)
    }

    /// [`Self::open`] with `first` written in the same write as the
    /// handshake; checks `Welcome` and returns what follows it.
    pub async fn open_pipelined(&self, first: &[u8]) -> Result<(UnixStream, BytesMut), BenchError> {
        let mut stream = connect_socket(&self.socket).await?;
        check_peer_uid(&stream, &self.socket, current_uid())?;
        let mut out = BytesMut::with_capacity(64 + first.len());
        out.extend_from_slice(&HandshakeFrame::new(&self.token));
        out.extend_from_slice(first);
        stream.write_all(&out).await?;
        out.fill(0);
        let mut buf = BytesMut::with_capacity(256);
        loop {
            if buf.len() >= LENGTH_PREFIX_LEN {
                let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if len > MAX_FRAME_LEN {
                    return verify(format!("first frame of {len} bytes"));
                }
                if buf.len() >= LENGTH_PREFIX_LEN + len {
                    let frame =
                        Bytes::copy_from_slice(&buf[LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + len]);
                    match DaemonFrame::decode(&frame) {
                        Ok(DaemonFrame::Welcome(_)) => {}
                        other => return verify(format!("expected Welcome, got {other:?}")),
                    }
                    buf.advance(LENGTH_PREFIX_LEN + len);
                    return Ok((stream, buf));
                }
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return verify("the daemon closed the connection before answering the handshake");
            }
        }
    }
}

/// The keyhole protocol for one workload: `Ping`, or the hub's `Publish` on
/// `topic`.
pub struct Keyhole {
    daemon: Daemon,
    request: Template,
    reply: Template,
    topic: String,
    /// Whether the workload publishes (else it pings).
    publishes: bool,
    /// The most receivers a `Published` may count.
    receivers: u64,
    subscribed: Template,
    /// Event frame payload up to the sequence number.
    event_head: Vec<u8>,
    payload_len: usize,
}

impl Keyhole {
    /// Transport `Ping`, answered with `Ack`.
    pub fn ping(daemon: Daemon) -> Self {
        Self::new(daemon, None, 0, 0)
    }

    /// Publish `payload_len` bytes on `topic`, answered with `Published`
    /// counting at most `receivers` subscriptions.
    pub fn publish(daemon: Daemon, topic: &str, payload_len: usize, receivers: u64) -> Self {
        Self::new(daemon, Some(topic), payload_len, receivers)
    }

    fn new(daemon: Daemon, topic: Option<&str>, payload_len: usize, receivers: u64) -> Self {
        let (request, reply) = match topic {
            None => (
                Template::of(|id, dst| {
                    encode_request::<()>(dst, id, RequestKind::Ping, None, MAX_FRAME_LEN)
                        .expect("Ping encodes")
                }),
                Template::of(|id, dst| encode_ack(dst, id)),
            ),
            Some(topic) => {
                let publish = HubRequest::Publish {
                    topic: topic.to_owned(),
                    payload: Payload::from(payload_pattern(payload_len)),
                };
                (
                    Template::of(move |id, dst| {
                        encode_request(dst, id, RequestKind::Call, Some(&publish), MAX_FRAME_LEN)
                            .expect("Publish encodes")
                    }),
                    Template::of(|id, dst| {
                        encode_reply(
                            dst,
                            id,
                            &HubReply::Published { receivers: 0 },
                            MAX_FRAME_LEN,
                        )
                        .expect("Published encodes")
                    }),
                )
            }
        };
        let publishes = topic.is_some();
        let subscribed = Template::of(|id, dst| {
            encode_reply(dst, id, &HubReply::Subscribed, MAX_FRAME_LEN).expect("Subscribed encodes")
        });
        let topic = topic.unwrap_or("keyhole-bench").to_owned();
        // The event layout up to the sequence number, from the encoder.
        let event = EncodedEvent::new(
            &HubEvent::Message {
                topic: topic.clone(),
                sequence: SENTINEL,
                payload: Payload::new(),
            },
            MAX_FRAME_LEN,
        )
        .expect("event encodes")
        .to_vec();
        let mut payload = event[LENGTH_PREFIX_LEN..].to_vec();
        // Events come on the subscription's stream: `subscribe` uses 1.
        payload[4..12].copy_from_slice(&SUBSCRIPTION.to_le_bytes());
        let payload = &payload[..];
        let seq_at = payload
            .windows(8)
            .position(|w| w == SENTINEL.to_le_bytes())
            .expect("sequence present");
        Self {
            event_head: payload[..seq_at].to_vec(),
            daemon,
            request,
            reply,
            publishes,
            topic,
            receivers,
            subscribed,
            payload_len,
        }
    }
}

impl Wire for Keyhole {
    type Stream = UnixStream;

    fn open(&self) -> impl Future<Output = Result<UnixStream, BenchError>> + Send {
        self.daemon.open()
    }

    fn open_pipelined(
        &self,
        first: &[u8],
    ) -> impl Future<Output = Result<(UnixStream, BytesMut), BenchError>> + Send {
        self.daemon.open_pipelined(first)
    }

    #[inline]
    fn request(&self, id: u64, out: &mut BytesMut) {
        self.request.put(id, out);
    }

    #[inline]
    fn reply(&self, id: u64, buf: &mut BytesMut) -> Result<bool, BenchError> {
        if self.publishes {
            self.reply.take_counted(id, buf, "reply", self.receivers)
        } else {
            self.reply.take(id, buf, "reply")
        }
    }
}

impl PubSub for Keyhole {
    async fn subscribe(&self, stream: &mut UnixStream) -> Result<(), BenchError> {
        let mut out = BytesMut::new();
        let subscribe = HubRequest::Subscribe {
            sid: SUBSCRIPTION,
            pattern: self.topic.clone(),
            lag: crate::hub::Lag::Disconnect,
        };
        encode_request(
            &mut out,
            1,
            RequestKind::Call,
            Some(&subscribe),
            MAX_FRAME_LEN,
        )
        .map_err(ClientError::from)?;
        stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(64);
        while !self.subscribed.take(1, &mut buf, "subscribe")? {
            if stream.read_buf(&mut buf).await? == 0 {
                return verify("daemon closed the connection before acknowledging Subscribe");
            }
        }
        Ok(())
    }

    #[inline]
    fn publish(&self, id: u64, payload: &[u8], out: &mut BytesMut) {
        // Topic and payload lengths come from the template; the payload
        // bytes from the caller.
        let frame_len = self.request.payload.len();
        debug_assert_eq!(payload.len(), self.payload_len);
        out.reserve(LENGTH_PREFIX_LEN + frame_len);
        out.put_u32_le(frame_len as u32);
        let at = out.len() + self.request.id_at;
        out.extend_from_slice(&self.request.payload[..frame_len - payload.len()]);
        out.extend_from_slice(payload);
        out[at..at + 8].copy_from_slice(&id.to_le_bytes());
    }

    #[inline]
    fn ack(&self, id: u64, buf: &mut BytesMut) -> Result<bool, BenchError> {
        self.reply
            .take_counted(id, buf, "publish reply", self.receivers)
    }

    #[inline]
    fn event(&self, buf: &[u8]) -> Result<Option<EventAt>, BenchError> {
        let head = self.event_head.len();
        let len = head + 16 + self.payload_len;
        if !whole_frame(buf, len)? {
            return Ok(None);
        }
        let frame = &buf[LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + len];
        if frame[..head] != self.event_head[..] {
            return verify(format!(
                "expected an event on {}, got {:?}",
                self.topic,
                DaemonFrame::decode(&Bytes::copy_from_slice(frame))
            ));
        }
        let seq = u64::from_le_bytes(frame[head..head + 8].try_into().expect("8"));
        let plen = u64::from_le_bytes(frame[head + 8..head + 16].try_into().expect("8"));
        if plen != self.payload_len as u64 {
            return verify(format!(
                "event payload of {plen} bytes, expected {}",
                self.payload_len
            ));
        }
        Ok(Some(EventAt {
            len: LENGTH_PREFIX_LEN + len,
            sequence: Some(seq),
            payload_at: LENGTH_PREFIX_LEN + head + 16,
        }))
    }
}

// ---------------------------------------------------------------------------
// keyhole request/reply

/// A second sentinel, for frames with two 8-byte fields to patch.
const SENTINEL2: u64 = 0x3c96_17e8_d1a5_c35a;

/// Offset of `value` (little-endian) in `haystack`, where the library's
/// encoder put it.
fn find_u64(haystack: &[u8], value: u64) -> usize {
    haystack
        .windows(8)
        .position(|w| w == value.to_le_bytes())
        .expect("sentinel present in the encoded frame")
}

#[inline]
fn read_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8"))
}

/// Whether `frame` is `want` except for the 8-byte fields at `holes`
/// (ascending).
#[inline]
fn same_except(frame: &[u8], want: &[u8], holes: &[usize]) -> bool {
    if frame.len() != want.len() {
        return false;
    }
    let mut from = 0;
    for &h in holes {
        if frame[from..h] != want[from..h] {
            return false;
        }
        from = h + 8;
    }
    frame[from..] == want[from..]
}

/// The length (prefix included) of the whole frame at the front of `buf`.
#[inline]
fn whole_frame_len(buf: &[u8]) -> Result<Option<usize>, BenchError> {
    if buf.len() < LENGTH_PREFIX_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return verify(format!("frame length {len} is over the protocol limit"));
    }
    if buf.len() < LENGTH_PREFIX_LEN + len {
        return Ok(None);
    }
    Ok(Some(LENGTH_PREFIX_LEN + len))
}

/// A frame that is not one of those expected, decoded for the message.
fn unexpected<T>(frame: &[u8], at: &str) -> Result<T, BenchError> {
    let payload = Bytes::copy_from_slice(&frame[LENGTH_PREFIX_LEN..]);
    verify(match DaemonFrame::decode(&payload) {
        Ok(DaemonFrame::Event { stream, body }) => format!(
            "{at}: unexpected event on stream {stream}: {:?}",
            crate::encoding::decode::<HubEvent>(&body)
        ),
        Ok(DaemonFrame::Reply { id, body }) => format!(
            "{at}: unexpected reply to id {id}: {:?}",
            crate::encoding::decode::<HubReply>(&body)
        ),
        Ok(other) => format!("{at}: unexpected frame {other:?}"),
        Err(err) => format!("{at}: undecodable frame of {} bytes: {err}", frame.len()),
    })
}

/// keyhole request/reply through the hub (proto-spec.md, Part II): the
/// responder `Serve`s a name and answers each `Request` event with
/// `Respond` (its token, the request's payload); the requester's `Request`
/// calls are answered `Requested`, then a `Response` event carries the
/// call's id and the responder's payload. Every frame is laid out by the
/// library's encoders (templates with sentinels for the ids, tokens and the
/// payload), and every byte the daemon sends is checked against them: ids,
/// name, the requester's uid and pid in the `Request` event,
/// `delivered: true`.
pub struct KeyholeRr {
    daemon: Daemon,
    name: String,
    payload_len: usize,
    ping: Template,
    ack: Template,
    serving: Template,
    /// Whole frames (prefix included) up to the payload, where one ends
    /// in a payload; the offsets are from the start of the frame.
    request: Vec<u8>,
    request_id_at: usize,
    requested: Vec<u8>,
    requested_id_at: usize,
    response: Vec<u8>,
    response_id_at: usize,
    request_event: Vec<u8>,
    request_event_token_at: usize,
    respond: Vec<u8>,
    respond_id_at: usize,
    respond_token_at: usize,
    responded: Vec<u8>,
    responded_id_at: usize,
}

impl KeyholeRr {
    /// Requests of `payload_len` bytes to `name` (a fresh name per run).
    pub fn new(daemon: Daemon, name: &str, payload_len: usize) -> Self {
        let pattern = payload_pattern(payload_len);
        let payload = || Payload::from(pattern.clone());
        let frame = |make: &dyn Fn(&mut BytesMut)| {
            let mut dst = BytesMut::new();
            make(&mut dst);
            dst.to_vec()
        };
        // A frame that ends in the payload, cut before it.
        let head = |mut f: Vec<u8>| {
            assert!(f.ends_with(&pattern), "the payload ends the frame");
            f.truncate(f.len() - pattern.len());
            f
        };
        let request = head(frame(&|dst| {
            let call = HubRequest::Request {
                name: name.to_owned(),
                timeout_ms: 0,
                payload: payload(),
            };
            encode_request(dst, SENTINEL, RequestKind::Call, Some(&call), MAX_FRAME_LEN)
                .expect("Request encodes")
        }));
        let requested = frame(&|dst| {
            encode_reply(dst, SENTINEL, &HubReply::Requested, MAX_FRAME_LEN)
                .expect("Requested encodes")
        });
        let event = |e: &HubEvent| {
            EncodedEvent::new(e, MAX_FRAME_LEN)
                .expect("event encodes")
                .to_vec()
        };
        let response = head(event(&HubEvent::Response {
            request: SENTINEL,
            outcome: Outcome::Reply { payload: payload() },
        }));
        // The daemon tells the responder who asked: this process.
        let request_event = head(event(&HubEvent::Request {
            token: SENTINEL,
            name: name.to_owned(),
            uid: current_uid(),
            pid: std::process::id(),
            payload: payload(),
        }));
        let respond = head(frame(&|dst| {
            let call = HubRequest::Respond {
                token: SENTINEL2,
                payload: payload(),
            };
            encode_request(dst, SENTINEL, RequestKind::Call, Some(&call), MAX_FRAME_LEN)
                .expect("Respond encodes")
        }));
        let responded = frame(&|dst| {
            encode_reply(
                dst,
                SENTINEL,
                &HubReply::Responded { delivered: true },
                MAX_FRAME_LEN,
            )
            .expect("Responded encodes")
        });
        // Each side tells its two kinds of frame apart by length.
        assert_ne!(requested.len(), response.len() + payload_len);
        assert_ne!(responded.len(), request_event.len() + payload_len);
        let respond_id_at = find_u64(&respond, SENTINEL);
        let respond_token_at = find_u64(&respond, SENTINEL2);
        assert!(respond_id_at < respond_token_at);
        Self {
            name: name.to_owned(),
            payload_len,
            ping: Template::of(|id, dst| {
                encode_request::<()>(dst, id, RequestKind::Ping, None, MAX_FRAME_LEN)
                    .expect("Ping encodes")
            }),
            ack: Template::of(|id, dst| encode_ack(dst, id)),
            serving: Template::of(|id, dst| {
                encode_reply(dst, id, &HubReply::Serving, MAX_FRAME_LEN).expect("Serving encodes")
            }),
            request_id_at: find_u64(&request, SENTINEL),
            request,
            requested_id_at: find_u64(&requested, SENTINEL),
            requested,
            response_id_at: find_u64(&response, SENTINEL),
            response,
            request_event_token_at: find_u64(&request_event, SENTINEL),
            request_event,
            respond_id_at,
            respond_token_at,
            respond,
            responded_id_at: find_u64(&responded, SENTINEL),
            responded,
            daemon,
        }
    }
}

impl Wire for KeyholeRr {
    type Stream = UnixStream;

    fn open(&self) -> impl Future<Output = Result<UnixStream, BenchError>> + Send {
        self.daemon.open()
    }

    fn open_pipelined(
        &self,
        first: &[u8],
    ) -> impl Future<Output = Result<(UnixStream, BytesMut), BenchError>> + Send {
        self.daemon.open_pipelined(first)
    }

    fn request(&self, id: u64, out: &mut BytesMut) {
        self.ping.put(id, out);
    }

    fn reply(&self, id: u64, buf: &mut BytesMut) -> Result<bool, BenchError> {
        self.ack.take(id, buf, "reply")
    }
}

impl ReqRep for KeyholeRr {
    async fn serve(&self, stream: &mut UnixStream) -> Result<(), BenchError> {
        let mut out = BytesMut::new();
        let serve = HubRequest::Serve {
            name: self.name.clone(),
        };
        encode_request(&mut out, 1, RequestKind::Call, Some(&serve), MAX_FRAME_LEN)
            .map_err(ClientError::from)?;
        stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(64);
        while !self.serving.take(1, &mut buf, "serve")? {
            if stream.read_buf(&mut buf).await? == 0 {
                return verify("daemon closed the connection before acknowledging Serve");
            }
        }
        Ok(())
    }

    async fn prepare_requester(&self, _stream: &mut UnixStream) -> Result<(), BenchError> {
        Ok(())
    }

    fn acknowledged(&self) -> bool {
        true
    }

    #[inline]
    fn send_request(&self, id: u64, payload: &[u8], out: &mut BytesMut) {
        debug_assert_eq!(payload.len(), self.payload_len);
        let at = out.len() + self.request_id_at;
        out.extend_from_slice(&self.request);
        out[at..at + 8].copy_from_slice(&id.to_le_bytes());
        out.extend_from_slice(payload);
    }

    #[inline]
    fn requester_item(&self, buf: &[u8]) -> Result<Option<RequesterItem>, BenchError> {
        let Some(len) = whole_frame_len(buf)? else {
            return Ok(None);
        };
        let frame = &buf[..len];
        if len == self.requested.len() {
            if same_except(frame, &self.requested, &[self.requested_id_at]) {
                let id = read_u64(frame, self.requested_id_at);
                return Ok(Some(RequesterItem::Accepted { len, id }));
            }
        } else if len == self.response.len() + self.payload_len {
            let head = &frame[..self.response.len()];
            if same_except(head, &self.response, &[self.response_id_at]) {
                return Ok(Some(RequesterItem::Response {
                    len,
                    id: read_u64(frame, self.response_id_at),
                    payload_at: self.response.len(),
                }));
            }
        }
        unexpected(frame, "requester")
    }

    #[inline]
    fn responder_item(
        &self,
        buf: &[u8],
        answer_id: u64,
        out: &mut BytesMut,
    ) -> Result<Option<ResponderItem>, BenchError> {
        let Some(len) = whole_frame_len(buf)? else {
            return Ok(None);
        };
        let frame = &buf[..len];
        if len == self.responded.len() {
            if same_except(frame, &self.responded, &[self.responded_id_at]) {
                let id = read_u64(frame, self.responded_id_at);
                return Ok(Some(ResponderItem::Acked { len, id }));
            }
        } else if len == self.request_event.len() + self.payload_len {
            let head_len = self.request_event.len();
            let token_at = self.request_event_token_at;
            if same_except(&frame[..head_len], &self.request_event, &[token_at]) {
                // Respond { token, the request's payload }.
                let at = out.len();
                out.extend_from_slice(&self.respond);
                out[at + self.respond_id_at..at + self.respond_id_at + 8]
                    .copy_from_slice(&answer_id.to_le_bytes());
                out[at + self.respond_token_at..at + self.respond_token_at + 8]
                    .copy_from_slice(&frame[token_at..token_at + 8]);
                out.extend_from_slice(&frame[head_len..]);
                return Ok(Some(ResponderItem::Answered { len }));
            }
        }
        unexpected(frame, "responder")
    }
}

/// The payload every publish carries after its 16-byte header.
pub fn payload_pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Running

/// When a workload stops.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After this many operations (requests, publishes, cycles).
    Ops(u64),
    /// After this long.
    Time(Duration),
}

/// Shared by the connections of one workload.
pub struct Run {
    stop: Stop,
    start: Instant,
    deadline: Instant,
    claimed: AtomicU64,
    /// Operations completed (for progress and the stall watchdog).
    pub done: AtomicU64,
    failed: AtomicBool,
}

impl Run {
    fn new(stop: Stop) -> Arc<Self> {
        let start = Instant::now();
        let deadline = match stop {
            Stop::Time(d) => start + d,
            Stop::Ops(_) => start + Duration::from_secs(365 * 24 * 3600),
        };
        Arc::new(Self {
            stop,
            start,
            deadline,
            claimed: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        })
    }

    /// Claims up to `want` operations; 0 when the run is over.
    #[inline]
    fn claim(&self, want: u64, now: Instant) -> u64 {
        if self.failed.load(Ordering::Relaxed) {
            return 0;
        }
        match self.stop {
            Stop::Time(_) => {
                if now >= self.deadline {
                    0
                } else {
                    want
                }
            }
            Stop::Ops(total) => {
                let before = self.claimed.fetch_add(want, Ordering::Relaxed);
                want.min(total.saturating_sub(before))
            }
        }
    }

    fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_nanos() as u64
    }
}

/// What a workload measured.
#[derive(Clone, Default)]
pub struct Measured {
    /// Operations (requests, deliveries, cycles).
    pub ops: u64,
    /// Payload bytes delivered (large, fanout).
    pub bytes: u64,
    /// Time from the first request to the last verified reply or delivery.
    pub elapsed: Duration,
    /// Latencies.
    pub hist: Histogram,
}

impl Measured {
    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Payload bytes per second.
    pub fn byte_rate(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `work` under a watchdog: it fails if `run.done` does not move for
/// `stall` (and, with a duration, if it overruns it by `stall`).
pub async fn supervise<T>(
    run: &Arc<Run>,
    stall: Duration,
    progress: Option<&str>,
    work: impl Future<Output = Result<T, BenchError>>,
) -> Result<T, BenchError> {
    let watchdog = async {
        let tick = Duration::from_millis(250);
        let mut last = run.done.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        let mut last_print = (Instant::now(), last);
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            let done = run.done.load(Ordering::Relaxed);
            if done != last {
                last = done;
                last_change = now;
            } else if now - last_change > stall {
                run.failed.store(true, Ordering::Relaxed);
                return BenchError::Stalled(stall);
            }
            if let Stop::Time(d) = run.stop {
                if now > run.start + d + stall {
                    run.failed.store(true, Ordering::Relaxed);
                    return BenchError::Stalled(stall);
                }
            }
            if let Some(name) = progress {
                let rate = (done - last_print.1) as f64 / (now - last_print.0).as_secs_f64();
                last_print = (now, done);
                eprint!("\r\x1b[K{name}: {done} done, {rate:.0}/s");
                let _ = std::io::stderr().flush();
            }
        }
    };
    let out = tokio::select! {
        out = work => out,
        err = watchdog => Err(err),
    };
    if progress.is_some() {
        eprint!("\r\x1b[K");
    }
    out
}

async fn join_all<T: Send + 'static>(
    run: &Arc<Run>,
    mut set: JoinSet<Result<T, BenchError>>,
) -> Result<Vec<T>, BenchError> {
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(err)) => {
                run.failed.store(true, Ordering::Relaxed);
                set.abort_all();
                return Err(err);
            }
            Err(join) => {
                run.failed.store(true, Ordering::Relaxed);
                set.abort_all();
                return verify(format!("a connection task failed: {join}"));
            }
        }
    }
    Ok(out)
}

/// When a request/response connection sends more requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refill {
    /// As each reply comes in: `pipeline` requests stay in flight.
    AsAnswered,
    /// Once every request in flight is answered: each write carries
    /// `pipeline` requests.
    Burst,
}

/// Request/response on `conns` connections with `pipeline` requests in
/// flight on each, sent again as `refill` says; replies are checked in
/// order. Connections are opened (and authenticated) before the clock
/// starts.
pub async fn request_response<W: Wire>(
    wire: Arc<W>,
    conns: usize,
    pipeline: usize,
    refill: Refill,
    stop: Stop,
    stall: Duration,
    progress: Option<&str>,
) -> Result<Measured, BenchError> {
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns.max(1) {
        streams.push(wire.open().await?);
    }
    let run = Run::new(stop);
    let mut set = JoinSet::new();
    for stream in streams {
        set.spawn(rr_connection(
            Arc::clone(&wire),
            stream,
            pipeline.max(1),
            refill,
            Arc::clone(&run),
        ));
    }
    let parts = supervise(&run, stall, progress, join_all(&run, set)).await?;
    let mut m = Measured::default();
    let mut last = run.start;
    for (ops, hist, end) in parts {
        m.ops += ops;
        m.hist.merge(&hist);
        last = last.max(end);
    }
    m.elapsed = last - run.start;
    Ok(m)
}

async fn rr_connection<W: Wire>(
    wire: Arc<W>,
    mut stream: W::Stream,
    pipeline: usize,
    refill: Refill,
    run: Arc<Run>,
) -> Result<(u64, Histogram, Instant), BenchError> {
    let mut hist = Histogram::default();
    let mut wbuf = BytesMut::with_capacity(4096);
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    // Send time of each request in flight, oldest first.
    let mut sent_at = std::collections::VecDeque::with_capacity(pipeline);
    let mut next_id: u64 = 1;
    let mut next_reply: u64 = 1;
    let mut open = true;
    let mut now = Instant::now();
    let mut end = now;
    loop {
        let room = match refill {
            Refill::AsAnswered => sent_at.len() < pipeline,
            Refill::Burst => sent_at.is_empty(),
        };
        if open && room {
            let want = (pipeline - sent_at.len()) as u64;
            let got = run.claim(want, now);
            if got < want {
                open = false;
            }
            for _ in 0..got {
                wire.request(next_id, &mut wbuf);
                next_id += 1;
                sent_at.push_back(now);
            }
            if !wbuf.is_empty() {
                stream.write_all(&wbuf).await?;
                wbuf.clear();
            }
        }
        if sent_at.is_empty() {
            break;
        }
        if stream.read_buf(&mut rbuf).await? == 0 {
            return verify(format!(
                "the server closed the connection with {} replies outstanding",
                sent_at.len()
            ));
        }
        now = Instant::now();
        let before = next_reply;
        loop {
            if let Some((len, answer)) = wire.control(&rbuf)? {
                rbuf.advance(len);
                wbuf.extend_from_slice(answer);
                continue;
            }
            let Some(&at) = sent_at.front() else {
                break;
            };
            if !wire.reply(next_reply, &mut rbuf)? {
                break;
            }
            sent_at.pop_front();
            next_reply += 1;
            hist.record_n(now.saturating_duration_since(at).as_nanos() as u64, 1);
        }
        if !wbuf.is_empty() {
            stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
        if sent_at.is_empty() && !rbuf.is_empty() {
            return verify(format!("{} unexpected bytes after the replies", rbuf.len()));
        }
        if next_reply > before {
            run.done.fetch_add(next_reply - before, Ordering::Relaxed);
            end = now;
        }
        if rbuf.capacity() - rbuf.len() < 4096 {
            rbuf.reserve(64 * 1024);
        }
    }
    Ok((next_reply - 1, hist, end))
}

/// Sequential cycles of open (connect, handshake) + one request + close.
/// `pipelined`: the request goes in the same write as the handshake
/// instead of after `Welcome` (one round trip instead of two).
pub async fn connect_cycle<W: Wire>(
    wire: Arc<W>,
    pipelined: bool,
    stop: Stop,
    stall: Duration,
    progress: Option<&str>,
) -> Result<Measured, BenchError> {
    let run = Run::new(stop);
    let work = async {
        let mut hist = Histogram::default();
        let mut wbuf = BytesMut::with_capacity(256);
        let mut rbuf = BytesMut::with_capacity(256);
        let mut cycles = 0u64;
        let mut end = run.start;
        loop {
            let started = Instant::now();
            if run.claim(1, started) == 0 {
                break;
            }
            wire.request(1, &mut wbuf);
            let mut stream = if pipelined {
                let (stream, rest) = wire.open_pipelined(&wbuf).await?;
                rbuf.extend_from_slice(&rest);
                stream
            } else {
                let mut stream = wire.open().await?;
                stream.write_all(&wbuf).await?;
                stream
            };
            wbuf.clear();
            while !wire.reply(1, &mut rbuf)? {
                if stream.read_buf(&mut rbuf).await? == 0 {
                    return verify("the server closed the connection before replying");
                }
            }
            if !rbuf.is_empty() {
                return verify("unexpected bytes after the reply");
            }
            drop(stream);
            end = Instant::now();
            hist.record_n((end - started).as_nanos() as u64, 1);
            cycles += 1;
            run.done.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Measured {
            ops: cycles,
            bytes: 0,
            elapsed: end - run.start,
            hist,
        })
    };
    supervise(&run, stall, progress, work).await
}

/// Fan-out: one publisher, `subscribers` reading subscribers (plus
/// `stalled` that subscribe and never read). At most `window` publishes are
/// in flight, counted until every reading subscriber has received them.
/// Every subscriber checks every event: payload bytes, the publish index in
/// it (none lost, none reordered) and contiguous sequence numbers. `ops` is
/// deliveries; `bytes` payload bytes delivered; the histogram holds
/// publish-to-delivery latencies.
#[allow(clippy::too_many_arguments)]
pub async fn fanout<W: PubSub>(
    wire: Arc<W>,
    payload_len: usize,
    subscribers: usize,
    stalled: usize,
    window: usize,
    stop: Stop,
    stall: Duration,
    progress: Option<&str>,
) -> Result<Measured, BenchError> {
    if payload_len < PAYLOAD_HEADER {
        return Err(BenchError::Usage(format!(
            "fan-out payloads must be at least {PAYLOAD_HEADER} bytes"
        )));
    }
    let subscribers = subscribers.max(1);
    let pattern: Arc<[u8]> = payload_pattern(payload_len).into();
    let mut streams = Vec::new();
    for _ in 0..subscribers + stalled {
        let mut s = wire.open().await?;
        wire.subscribe(&mut s).await?;
        streams.push(s);
    }
    let stalled_streams = streams.split_off(subscribers);
    let mut publisher = wire.open().await?;

    let run = Run::new(stop);
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect());
    let total = Arc::new(AtomicU64::new(u64::MAX));
    // Subscribers -> publisher: progress. Publisher -> subscribers: the total is known.
    let wake = Arc::new(Notify::new());
    let ended = Arc::new(Notify::new());
    let mut set = JoinSet::new();
    for (i, stream) in streams.into_iter().enumerate() {
        set.spawn(subscriber(
            Arc::clone(&wire),
            stream,
            i,
            Arc::clone(&received),
            Arc::clone(&total),
            Arc::clone(&wake),
            Arc::clone(&ended),
            Arc::clone(&pattern),
            Arc::clone(&run),
        ));
    }
    let publish = {
        let wire = Arc::clone(&wire);
        let run = Arc::clone(&run);
        let received = Arc::clone(&received);
        let total = Arc::clone(&total);
        let wake = Arc::clone(&wake);
        async move {
            let mut wbuf = BytesMut::with_capacity(64 * 1024);
            let mut rbuf = BytesMut::with_capacity(4096);
            let mut payload = pattern.to_vec();
            let mut sent = 0u64;
            let mut acked = 0u64;
            let mut open = true;
            let acks = wire.acks_publish();
            loop {
                let delivered = received
                    .iter()
                    .map(|r| r.load(Ordering::Acquire))
                    .min()
                    .unwrap_or(0);
                if open {
                    let room = (delivered + window as u64).saturating_sub(sent);
                    let now = Instant::now();
                    let got = if room > 0 { run.claim(room, now) } else { 0 };
                    if room > 0 && got < room {
                        open = false;
                        // Subscribers stop once they have this many.
                    }
                    let stamp = run.ns(now).to_le_bytes();
                    for _ in 0..got {
                        payload[..8].copy_from_slice(&sent.to_le_bytes());
                        payload[8..16].copy_from_slice(&stamp);
                        sent += 1;
                        wire.publish(sent, &payload, &mut wbuf);
                    }
                    if !open {
                        total.store(sent, Ordering::Release);
                        ended.notify_waiters();
                    }
                    if !acks {
                        acked = sent;
                    }
                }
                if !wbuf.is_empty() {
                    publisher.write_all(&wbuf).await?;
                    wbuf.clear();
                }
                if !open && acked == sent && delivered == sent {
                    break;
                }
                let notified = wake.notified();
                tokio::select! {
                    // Without acks, still read: the server's own messages
                    // (NATS: PING) are answered, anything else fails the run.
                    n = publisher.read_buf(&mut rbuf), if acked < sent || !acks => {
                        if n? == 0 {
                            return verify("the server closed the publisher's connection");
                        }
                        loop {
                            if let Some((len, answer)) = wire.control(&rbuf)? {
                                rbuf.advance(len);
                                wbuf.extend_from_slice(answer);
                            } else if acked < sent && wire.ack(acked + 1, &mut rbuf)? {
                                acked += 1;
                            } else {
                                break;
                            }
                        }
                        if acks && acked == sent && !rbuf.is_empty() {
                            return verify("unexpected bytes after the publish acks");
                        }
                    }
                    _ = notified => {}
                }
            }
            if !rbuf.is_empty() {
                return verify(format!(
                    "{} unexpected bytes on the publisher's connection: {:?}",
                    rbuf.len(),
                    String::from_utf8_lossy(&rbuf[..rbuf.len().min(80)])
                ));
            }
            drop(stalled_streams);
            Ok::<u64, BenchError>(sent)
        }
    };
    let work = async {
        let (sent, parts) = tokio::try_join!(publish, join_all(&run, set))?;
        let mut m = Measured::default();
        let mut last = run.start;
        for (count, hist, end) in parts {
            if count != sent {
                return verify(format!("a subscriber got {count} events of {sent}"));
            }
            m.ops += count;
            m.hist.merge(&hist);
            last = last.max(end);
        }
        m.bytes = m.ops * payload_len as u64;
        m.elapsed = last - run.start;
        Ok(m)
    };
    supervise(&run, stall, progress, work).await
}

#[allow(clippy::too_many_arguments)]
async fn subscriber<W: PubSub>(
    wire: Arc<W>,
    mut stream: W::Stream,
    me: usize,
    received: Arc<Vec<AtomicU64>>,
    total: Arc<AtomicU64>,
    wake: Arc<Notify>,
    ended: Arc<Notify>,
    pattern: Arc<[u8]>,
    run: Arc<Run>,
) -> Result<(u64, Histogram, Instant), BenchError> {
    let mut hist = Histogram::default();
    let mut rbuf = BytesMut::with_capacity(256 * 1024);
    let mut count = 0u64;
    let mut last_seq: Option<u64> = None;
    let mut end = run.start;
    loop {
        // Created before the check, so the announcement cannot slip between.
        let announced = ended.notified();
        if count >= total.load(Ordering::Acquire) {
            break;
        }
        tokio::select! {
            n = stream.read_buf(&mut rbuf) => {
                if n? == 0 {
                    return verify(format!("subscriber {me}: the server closed the connection after {count} events"));
                }
            }
            // The total is announced while this subscriber may be idle.
            _ = announced => continue,
        }
        let now = Instant::now();
        let now_ns = run.ns(now);
        let before = count;
        let mut answers = Vec::new();
        loop {
            if let Some((len, answer)) = wire.control(&rbuf)? {
                rbuf.advance(len);
                answers.extend_from_slice(answer);
                continue;
            }
            let Some(at) = wire.event(&rbuf)? else {
                break;
            };
            let payload = &rbuf[at.payload_at..at.payload_at + pattern.len()];
            let index = u64::from_le_bytes(payload[..8].try_into().expect("8"));
            if index != count {
                return verify(format!(
                    "subscriber {me}: event with publish index {index}, expected {count} (lost or reordered)"
                ));
            }
            if let Some(seq) = at.sequence {
                if let Some(last) = last_seq {
                    if seq != last.wrapping_add(1) {
                        return verify(format!("subscriber {me}: sequence {seq} after {last}"));
                    }
                }
                last_seq = Some(seq);
            }
            if payload[PAYLOAD_HEADER..] != pattern[PAYLOAD_HEADER..] {
                return verify(format!(
                    "subscriber {me}: payload of event {index} corrupted"
                ));
            }
            let stamp = u64::from_le_bytes(payload[8..16].try_into().expect("8"));
            hist.record_n(now_ns.saturating_sub(stamp), 1);
            count += 1;
            rbuf.advance(at.len);
        }
        if !answers.is_empty() {
            stream.write_all(&answers).await?;
        }
        if count > before {
            received[me].store(count, Ordering::Release);
            run.done.fetch_add(count - before, Ordering::Relaxed);
            wake.notify_one();
            end = now;
        }
        if rbuf.capacity() - rbuf.len() < 16 * 1024 {
            rbuf.reserve(256 * 1024);
        }
    }
    if !rbuf.is_empty() {
        return verify(format!(
            "subscriber {me}: {} bytes after the last event",
            rbuf.len()
        ));
    }
    Ok((count, hist, end))
}

/// Request/reply through the server: one responder connection, one
/// requester connection with at most `window` requests in flight (sent and
/// not yet answered), `payload_len`-byte payloads (a 16-byte header: the
/// request id and the send time). The responder answers each request as it
/// reads it, with the request's payload. The requester checks every answer:
/// it is for a request in flight and not answered before (the correlation:
/// keyhole's request id, NATS's reply subject), the id in its payload is the
/// same, every other byte is what was sent; and, where the server
/// acknowledges requests and answers, that every request was accepted
/// before its answer came and every answer was taken. `ops` is round
/// trips; the histogram holds round-trip times.
pub async fn request_reply<W: ReqRep>(
    wire: Arc<W>,
    payload_len: usize,
    window: usize,
    stop: Stop,
    stall: Duration,
    progress: Option<&str>,
) -> Result<Measured, BenchError> {
    if payload_len < PAYLOAD_HEADER {
        return Err(BenchError::Usage(format!(
            "request payloads must be at least {PAYLOAD_HEADER} bytes"
        )));
    }
    let pattern: Arc<[u8]> = payload_pattern(payload_len).into();
    let mut responder_stream = wire.open().await?;
    wire.serve(&mut responder_stream).await?;
    let mut requester_stream = wire.open().await?;
    wire.prepare_requester(&mut requester_stream).await?;
    let run = Run::new(stop);
    let total = Arc::new(AtomicU64::new(u64::MAX));
    let ended = Arc::new(Notify::new());
    let mut set = JoinSet::new();
    set.spawn(responder(
        Arc::clone(&wire),
        responder_stream,
        Arc::clone(&total),
        Arc::clone(&ended),
    ));
    let work = async {
        let ask = requester(
            Arc::clone(&wire),
            requester_stream,
            window.max(1),
            Arc::clone(&pattern),
            Arc::clone(&run),
            Arc::clone(&total),
            Arc::clone(&ended),
        );
        let ((ops, hist, end), answered) = tokio::try_join!(ask, join_all(&run, set))?;
        if answered != [ops] {
            return verify(format!(
                "the responder answered {answered:?} requests, the requester got {ops} answers"
            ));
        }
        Ok(Measured {
            ops,
            bytes: ops * payload_len as u64,
            elapsed: end - run.start,
            hist,
        })
    };
    supervise(&run, stall, progress, work).await
}

async fn requester<W: ReqRep>(
    wire: Arc<W>,
    mut stream: W::Stream,
    window: usize,
    pattern: Arc<[u8]>,
    run: Arc<Run>,
    total: Arc<AtomicU64>,
    ended: Arc<Notify>,
) -> Result<(u64, Histogram, Instant), BenchError> {
    let acknowledged = wire.acknowledged();
    let mut hist = Histogram::default();
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut payload = pattern.to_vec();
    // Whether each request from `oldest` on has been answered.
    let mut answered_flags = std::collections::VecDeque::with_capacity(window);
    let mut oldest: u64 = 1;
    let mut in_flight = 0usize;
    let mut sent = 0u64;
    let mut accepted = 0u64;
    let mut answered = 0u64;
    let mut open = true;
    let mut now = Instant::now();
    let mut end = run.start;
    loop {
        if open && in_flight < window {
            let want = (window - in_flight) as u64;
            let got = run.claim(want, now);
            if got < want {
                open = false;
            }
            let stamp = run.ns(now).to_le_bytes();
            for _ in 0..got {
                sent += 1;
                payload[..8].copy_from_slice(&sent.to_le_bytes());
                payload[8..16].copy_from_slice(&stamp);
                wire.send_request(sent, &payload, &mut wbuf);
                answered_flags.push_back(false);
                in_flight += 1;
            }
            if !open {
                total.store(sent, Ordering::Release);
                ended.notify_waiters();
            }
        }
        if !wbuf.is_empty() {
            stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
        if !open && in_flight == 0 && (!acknowledged || accepted == sent) {
            break;
        }
        if stream.read_buf(&mut rbuf).await? == 0 {
            return verify(format!(
                "the server closed the requester's connection with {in_flight} requests in flight"
            ));
        }
        now = Instant::now();
        let now_ns = run.ns(now);
        let before = answered;
        loop {
            if let Some((len, answer)) = wire.control(&rbuf)? {
                rbuf.advance(len);
                wbuf.extend_from_slice(answer);
                continue;
            }
            match wire.requester_item(&rbuf)? {
                None => break,
                Some(RequesterItem::Accepted { len, id }) => {
                    if id != accepted + 1 || id > sent {
                        return verify(format!(
                            "request {id} accepted after request {accepted} ({sent} sent)"
                        ));
                    }
                    accepted = id;
                    rbuf.advance(len);
                }
                Some(RequesterItem::Response {
                    len,
                    id,
                    payload_at,
                }) => {
                    if id < oldest || id > sent || answered_flags[(id - oldest) as usize] {
                        return verify(format!(
                            "an answer to request {id}, which is not in flight ({sent} sent)"
                        ));
                    }
                    if acknowledged && id > accepted {
                        return verify(format!(
                            "the answer to request {id} came before it was accepted"
                        ));
                    }
                    let got = &rbuf[payload_at..payload_at + pattern.len()];
                    let index = u64::from_le_bytes(got[..8].try_into().expect("8"));
                    if index != id {
                        return verify(format!(
                            "the answer to request {id} carries the payload of request {index}"
                        ));
                    }
                    if got[PAYLOAD_HEADER..] != pattern[PAYLOAD_HEADER..] {
                        return verify(format!("the answer to request {id} is corrupted"));
                    }
                    let stamp = u64::from_le_bytes(got[8..16].try_into().expect("8"));
                    hist.record_n(now_ns.saturating_sub(stamp), 1);
                    answered_flags[(id - oldest) as usize] = true;
                    while answered_flags.front() == Some(&true) {
                        answered_flags.pop_front();
                        oldest += 1;
                    }
                    in_flight -= 1;
                    answered += 1;
                    rbuf.advance(len);
                }
            }
        }
        if answered > before {
            run.done.fetch_add(answered - before, Ordering::Relaxed);
            end = now;
        }
        if rbuf.capacity() - rbuf.len() < 4096 {
            rbuf.reserve(64 * 1024);
        }
    }
    if !rbuf.is_empty() {
        return verify(format!(
            "{} unexpected bytes after the last answer",
            rbuf.len()
        ));
    }
    Ok((answered, hist, end))
}

async fn responder<W: ReqRep>(
    wire: Arc<W>,
    mut stream: W::Stream,
    total: Arc<AtomicU64>,
    ended: Arc<Notify>,
) -> Result<u64, BenchError> {
    let acknowledged = wire.acknowledged();
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut answered = 0u64;
    let mut acked = 0u64;
    loop {
        // Created before the check, so the announcement cannot slip between.
        let announced = ended.notified();
        if answered >= total.load(Ordering::Acquire) && (!acknowledged || acked == answered) {
            break;
        }
        tokio::select! {
            n = stream.read_buf(&mut rbuf) => {
                if n? == 0 {
                    return verify(format!(
                        "the server closed the responder's connection after {answered} requests"
                    ));
                }
            }
            _ = announced => continue,
        }
        loop {
            if let Some((len, answer)) = wire.control(&rbuf)? {
                rbuf.advance(len);
                wbuf.extend_from_slice(answer);
                continue;
            }
            match wire.responder_item(&rbuf, answered + 1, &mut wbuf)? {
                None => break,
                Some(ResponderItem::Answered { len }) => {
                    answered += 1;
                    rbuf.advance(len);
                }
                Some(ResponderItem::Acked { len, id }) => {
                    if id != acked + 1 || id > answered {
                        return verify(format!(
                            "answer {id} acknowledged after answer {acked} ({answered} sent)"
                        ));
                    }
                    acked = id;
                    rbuf.advance(len);
                }
            }
        }
        if !wbuf.is_empty() {
            stream.write_all(&wbuf).await?;
            wbuf.clear();
        }
        if rbuf.capacity() - rbuf.len() < 4096 {
            rbuf.reserve(64 * 1024);
        }
    }
    if answered != total.load(Ordering::Acquire) {
        return verify(format!(
            "the responder got {answered} requests, {} were sent",
            total.load(Ordering::Acquire)
        ));
    }
    if !rbuf.is_empty() {
        return verify(format!(
            "{} unexpected bytes after the responder's last request",
            rbuf.len()
        ));
    }
    Ok(answered)
}

// ---------------------------------------------------------------------------
// The subcommand

fn fmt_ns(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.1} us", ns as f64 / 1e3)
    }
}

/// Formats a rate with a k/M suffix.
pub fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.1}")
    }
}

/// `keyhole bench`: resolves the socket and token as every subcommand does
/// (a first connection reports a missing daemon or token the usual way),
/// then runs the workloads.
pub async fn run_with(
    options: ConnectOptions,
    timeout: Duration,
    args: &BenchArgs,
) -> Result<(), BenchError> {
    drop(options.connect_hub().await?);
    let daemon = Daemon {
        socket: options.resolve_socket()?,
        token: options.resolve_token()?,
        timeout,
    };
    run(daemon, args).await
}

/// The shape line's note of `--burst`.
fn burst_note(burst: bool) -> &'static str {
    if burst { " (in bursts)" } else { "" }
}

/// Runs `keyhole bench` against the daemon at `daemon`.
pub async fn run(daemon: Daemon, args: &BenchArgs) -> Result<(), BenchError> {
    let usage = |m: String| Err(BenchError::Usage(m));
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        return usage(format!("-c must be 1 to {MAX_CONNECTIONS}"));
    }
    if args.subscribers == 0 || args.subscribers > MAX_CONNECTIONS {
        return usage(format!("-S must be 1 to {MAX_CONNECTIONS}"));
    }
    if args.pipeline == 0 || args.pipeline > MAX_PIPELINE {
        return usage(format!("-P must be 1 to {MAX_PIPELINE}"));
    }
    if args.payload < PAYLOAD_HEADER || args.payload > MAX_FRAME_LEN - 1024 {
        return usage(format!(
            "--payload must be {PAYLOAD_HEADER} to {} bytes",
            MAX_FRAME_LEN - 1024
        ));
    }
    let stop = match (args.requests, args.duration) {
        (Some(0), _) => return usage("-n must be at least 1".into()),
        (Some(n), _) => Stop::Ops(n),
        (None, Some(d)) if d.is_finite() && d > 0.0 && d <= MAX_DURATION_SECS => {
            Stop::Time(Duration::from_secs_f64(d))
        }
        (None, Some(d)) => {
            return usage(format!(
                "--duration must be above 0 and at most {MAX_DURATION_SECS} s, got {d}"
            ));
        }
        (None, None) => Stop::Time(Duration::from_secs(if args.quick { 1 } else { 5 })),
    };
    let workloads: &[Workload] = if args.workloads.is_empty() {
        &Workload::ALL
    } else {
        &args.workloads
    };
    let refill = if args.burst {
        Refill::Burst
    } else {
        Refill::AsAnswered
    };
    let stall = daemon.timeout;
    let tty = std::io::stderr().is_terminal();
    let tag = format!("keyhole-bench.{}", std::process::id());
    let mut out = std::io::stdout().lock();
    let mut reports = Vec::new();
    for &w in workloads {
        let progress = tty.then_some(w.name());
        let (m, shape, unit, [connections, in_flight, payload_bytes, subscribers]) = match w {
            Workload::Ping => (
                request_response(
                    Arc::new(Keyhole::ping(daemon.clone())),
                    args.connections,
                    args.pipeline,
                    refill,
                    stop,
                    stall,
                    progress,
                )
                .await?,
                format!(
                    "{} conns, {} in flight each{}",
                    args.connections,
                    args.pipeline,
                    burst_note(args.burst)
                ),
                "requests",
                [Some(args.connections), Some(args.pipeline), None, None],
            ),
            Workload::Publish => (
                request_response(
                    Arc::new(Keyhole::publish(
                        daemon.clone(),
                        &format!("{tag}.publish"),
                        args.payload,
                        0,
                    )),
                    args.connections,
                    args.pipeline,
                    refill,
                    stop,
                    stall,
                    progress,
                )
                .await?,
                format!(
                    "{} conns, {} in flight each{}, {} B, no subscriber",
                    args.connections,
                    args.pipeline,
                    burst_note(args.burst),
                    args.payload
                ),
                "requests",
                [
                    Some(args.connections),
                    Some(args.pipeline),
                    Some(args.payload),
                    None,
                ],
            ),
            Workload::Fanout => (
                fanout(
                    Arc::new(Keyhole::publish(
                        daemon.clone(),
                        &format!("{tag}.fanout"),
                        args.payload,
                        args.subscribers as u64,
                    )),
                    args.payload,
                    args.subscribers,
                    0,
                    args.pipeline,
                    stop,
                    stall,
                    progress,
                )
                .await?,
                format!(
                    "1 -> {} subscribers, {} B, {} publishes in flight",
                    args.subscribers, args.payload, args.pipeline
                ),
                "deliveries",
                [
                    Some(1),
                    Some(args.pipeline),
                    Some(args.payload),
                    Some(args.subscribers),
                ],
            ),
            Workload::Connect => (
                connect_cycle(
                    Arc::new(Keyhole::ping(daemon.clone())),
                    args.pipelined,
                    stop,
                    stall,
                    progress,
                )
                .await?,
                if args.pipelined {
                    "connect + handshake and ping in one write + close, sequential".to_string()
                } else {
                    "connect + handshake + ping + close, sequential".to_string()
                },
                "cycles",
                [Some(1), Some(1), None, None],
            ),
            Workload::Large => (
                fanout(
                    Arc::new(Keyhole::publish(
                        daemon.clone(),
                        &format!("{tag}.large"),
                        LARGE_PAYLOAD,
                        1,
                    )),
                    LARGE_PAYLOAD,
                    1,
                    0,
                    args.pipeline,
                    stop,
                    stall,
                    progress,
                )
                .await?,
                format!(
                    "1 MiB publishes to 1 subscriber, {} in flight",
                    args.pipeline
                ),
                "deliveries",
                [Some(1), Some(args.pipeline), Some(LARGE_PAYLOAD), Some(1)],
            ),
        };
        let h = &m.hist;
        reports.push(WorkloadReport {
            workload: w.name(),
            shape,
            connections,
            in_flight,
            payload_bytes,
            subscribers,
            unit,
            ops: m.ops,
            elapsed_s: m.elapsed.as_secs_f64(),
            ops_per_s: m.rate(),
            bytes: m.bytes,
            bytes_per_s: m.byte_rate(),
            p50_ns: h.quantile(0.5),
            p99_ns: h.quantile(0.99),
            p999_ns: h.quantile(0.999),
            max_ns: h.max(),
        });
        if !args.json {
            // Each workload's report as soon as it has run.
            if let Some(r) = reports.last() {
                print_workload(&mut out, r);
            }
        }
    }
    if args.json {
        let report = BenchReport { workloads: reports };
        if serde_json::to_writer(&mut out, &report).is_ok() {
            let _ = writeln!(out);
        }
        let _ = out.flush();
        return Ok(());
    }
    let _ = writeln!(
        out,
        "{:<8} {:>12} {:>11} {:>11} {:>11}",
        "workload", "ops/s", "p50", "p99", "p99.9"
    );
    for r in &reports {
        let _ = writeln!(
            out,
            "{:<8} {:>12} {:>11} {:>11} {:>11}",
            r.workload,
            fmt_rate(r.ops_per_s),
            fmt_ns(r.p50_ns),
            fmt_ns(r.p99_ns),
            fmt_ns(r.p999_ns),
        );
    }
    Ok(())
}

/// One workload's part of the text report.
fn print_workload(out: &mut impl std::io::Write, r: &WorkloadReport) {
    let unit = r.unit;
    let _ = writeln!(out, "====== {} ======", r.workload);
    let _ = writeln!(out, "  {}", r.shape);
    let _ = writeln!(
        out,
        "  {} {unit} in {:.3} s, every one verified",
        r.ops, r.elapsed_s
    );
    let _ = writeln!(out, "  throughput: {:.1} {unit}/s", r.ops_per_s);
    if r.bytes > 0 {
        let _ = writeln!(
            out,
            "  payload:    {:.1} MiB/s",
            r.bytes_per_s / (1u64 << 20) as f64
        );
    }
    let _ = writeln!(
        out,
        "  latency:    p50 {}  p99 {}  p99.9 {}  max {}",
        fmt_ns(r.p50_ns),
        fmt_ns(r.p99_ns),
        fmt_ns(r.p999_ns),
        fmt_ns(r.max_ns)
    );
    let _ = writeln!(out);
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    // Imports inside the tests: benches/compare.rs includes this file in a
    // target built with cfg(test) but without the test harness.

    #[test]
    fn histogram_quantiles_are_within_a_few_percent() {
        use super::*;
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record_n(v * 1000, 1);
        }
        for (q, want) in [
            (0.5, 50_000_000.0),
            (0.99, 99_000_000.0),
            (0.999, 99_900_000.0),
        ] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.04, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.total, 100_000);
        for v in [0u64, 1, 63, 64, 65, 1000, 1 << 40, u64::MAX] {
            let b = Histogram::bucket(v).min(BUCKETS - 1);
            assert!(Histogram::lower(b) <= v, "{v}");
        }
    }

    /// An echo of 8-byte requests that answers the first request of each
    /// read at once and the rest 2 ms later, recording each read's size.
    struct SlowEcho {
        path: std::path::PathBuf,
    }

    impl super::Wire for SlowEcho {
        type Stream = tokio::net::UnixStream;
        async fn open(&self) -> Result<Self::Stream, super::BenchError> {
            Ok(tokio::net::UnixStream::connect(&self.path).await?)
        }
        async fn open_pipelined(
            &self,
            _first: &[u8],
        ) -> Result<(Self::Stream, bytes::BytesMut), super::BenchError> {
            unreachable!("not used by request_response")
        }
        fn request(&self, id: u64, out: &mut bytes::BytesMut) {
            out.extend_from_slice(&id.to_le_bytes());
        }
        fn reply(&self, id: u64, buf: &mut bytes::BytesMut) -> Result<bool, super::BenchError> {
            use bytes::Buf;
            if buf.len() < 8 {
                return Ok(false);
            }
            assert_eq!(buf.get_u64_le(), id, "replies in order");
            Ok(true)
        }
    }

    /// Runs 80 requests, 8 in flight, refilled as `refill` says, against
    /// [`SlowEcho`]; returns the sizes of the server's reads.
    async fn read_sizes(refill: super::Refill) -> Vec<usize> {
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut sizes = Vec::new();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = conn.read(&mut buf).await.unwrap();
                if n == 0 {
                    return sizes;
                }
                sizes.push(n);
                conn.write_all(&buf[..8]).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                conn.write_all(&buf[8..n]).await.unwrap();
            }
        });
        let wire = Arc::new(SlowEcho { path });
        let m = super::request_response(
            wire,
            1,
            8,
            refill,
            super::Stop::Ops(80),
            std::time::Duration::from_secs(10),
            None,
        )
        .await
        .unwrap();
        assert_eq!(m.ops, 80);
        server.await.unwrap()
    }

    #[tokio::test]
    async fn bursts_send_the_next_window_only_when_all_are_answered() {
        // Each write carries exactly the window, so each read of the
        // server's is 8 requests.
        assert_eq!(read_sizes(super::Refill::Burst).await, vec![64; 10]);
        // Refilled as answered, the first early reply lets one request
        // through on its own.
        let sizes = read_sizes(super::Refill::AsAnswered).await;
        assert!(sizes.contains(&8), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 640);
    }

    #[test]
    fn templates_find_the_id() {
        use super::*;
        let t = Template::of(|id, dst| encode_ack(dst, id));
        let mut buf = BytesMut::new();
        t.put(7, &mut buf);
        assert_eq!(
            DaemonFrame::decode(&Bytes::copy_from_slice(&buf[4..])).unwrap(),
            DaemonFrame::Ack { id: 7 }
        );
        assert!(t.take(7, &mut buf.clone(), "x").unwrap());
        assert!(t.take(8, &mut buf, "x").is_err());
    }
}
