//! The `session` fuzz target: an `arbitrary`-derived sequence of client
//! operations (handshake variants, requests, raw bytes, partial writes,
//! reads, disconnects, file descriptors passed with frames) driven against
//! the server's real connection logic ([`Server::serve_stream`]) over an
//! in-memory socket pair.
//!
//! Invariants, checked against a model of what was written:
//! - no request is served before authentication: unless the first 44 bytes
//!   written are exactly the valid handshake, the peer receives exactly one
//!   frame, an `Error` without id, and then EOF (descriptors sent with
//!   those bytes change nothing);
//! - after a valid handshake the first frame is `Welcome` naming the hub;
//!   when only well-formed requests followed, every reply answers them in
//!   order (ids ascending, one reply per request, `Ack` for the transport's
//!   requests, `Reply` or an `Error` with the id for the hub's), and, unless
//!   the daemon sent `Closing`, every request up to the first one that
//!   closes the connection is answered; a message event comes only on a
//!   stream this connection subscribed with a pattern that matches its
//!   topic (checked against an independent model of the matching rules),
//!   requests only for names it serves, responses only to requests it
//!   sent, and `Closing` is last;
//! - descriptors (proto-spec.md section 19): `AcceptFds` is answered `Ack`;
//!   a `CallFds` before it `DescriptorsNotAccepted` with the id; after it, a
//!   count of 0 or over 8, or more than 8 descriptors, `TooManyDescriptors`
//!   without id and the close; descriptors that do not match the count
//!   `DescriptorMismatch` without id and the close; descriptors that came
//!   with a frame announcing none, that frame's answer, then
//!   `DescriptorMismatch` (or `TooManyDescriptors`, for more than 8) and the
//!   close; a `PublishMemfd` with one sealed memfd `Published`,
//!   with anything else the hub's `BadMemfd` (1008); another hub request
//!   with descriptors `BadMemfd`; ancillary data that carries no descriptor
//!   changes nothing. No frame of tag 7 or 8 reaches a connection that did
//!   not send `AcceptFds` (nor before its `Ack`), and every descriptor
//!   handed to the daemon is closed once the connection has ended: each
//!   pipe whose write end was sent sees EOF (no leak).

use std::cell::{Cell, RefCell};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use super::fuzz_token;
use super::subjects::pattern_matches;
use crate::encoding::Payload;
use crate::handshake::HandshakeFrame;
use crate::hub::{
    HubError, HubEvent, HubReply, HubRequest, HubService, Lag, check_pattern, valid_topic,
};
use crate::limits::{HANDSHAKE_FRAME_LEN, MAX_FDS_PER_FRAME, MAX_FRAME_LEN, MAX_TOPIC_LEN};
use crate::server::{Server, ServerConfig};
use crate::transport::{
    DaemonFrame, ErrorCode, ErrorFrame, RequestKind, TransportCode, encode_call_fds, encode_request,
};

/// Most operations and bytes one input may produce (keeps runs fast).
const MAX_OPS: usize = 64;
const MAX_WIRE: usize = 64 * 1024;

/// The most descriptors an operation attaches (one more than a frame may
/// carry), except [`Operation::Spray`].
const MAX_ATTACHED: usize = MAX_FDS_PER_FRAME + 1;

/// What [`Operation::Spray`] attaches: the most one `sendmsg` may carry on
/// Linux (`SCM_MAX_FD`), all of them the same pipe.
const SPRAY: usize = 253;

/// Topics the operations pick from by index: valid ones and invalid ones.
fn topic(index: u8) -> String {
    match index % 7 {
        0 => "a".into(),
        1 => "b".into(),
        2 => "a.b".into(),
        3 => "news.ünï.x".into(),
        4 => String::new(),
        5 => "a..b".into(),
        _ => "t".repeat(MAX_TOPIC_LEN + 1),
    }
}

/// Patterns the subscriptions pick from by index.
fn pattern(index: u8) -> String {
    match index % 9 {
        0..=3 => topic(index % 4),
        4 => "a.*".into(),
        5 => ">".into(),
        6 => "*.ünï.>".into(),
        7 => "a.>.b".into(),
        _ => "*".into(),
    }
}

/// One well-formed request.
#[derive(Debug, Clone, Arbitrary)]
pub enum FuzzRequest {
    /// Ping.
    Ping,
    /// Status.
    Status,
    /// Subscribe with id `sid` (0 and ids in use are refused) to
    /// `pattern(i)`, dropping the oldest events when behind if the flag is
    /// set.
    Subscribe(u8, u8, bool),
    /// Unsubscribe `sid`.
    Unsubscribe(u8),
    /// Serve `topic(i)`.
    Serve(u8),
    /// Send a request to `topic(i)`.
    Request(u8, Vec<u8>),
    /// Answer request `token`.
    Respond(u64, Vec<u8>),
    /// Publish on `topic(i)`.
    Publish(u8, Vec<u8>),
    /// Shutdown (the peer is the daemon's own uid: allowed).
    Shutdown,
    /// `Expect` naming a service (one of a few names, by index) and a
    /// version: `hub` 2 is answered with `Ack`, anything else closes the
    /// connection with `WrongService`.
    Expect(u8, u32),
    /// A request kind this daemon does not know (`REQUEST_KINDS` and up).
    Unknown(u32),
    /// A `Call` whose body is these bytes (mostly not a hub request).
    BadBody(Vec<u8>),
    /// `PublishMemfd` on `topic(i)` as a plain `Call`, without its memfd:
    /// refused with the id (`BadMemfd`, or `InvalidTopic`).
    PublishMemfd(u8),
    /// `AcceptFds` with a body of `1 + n % 8` bytes: `BadRequest` with the
    /// id, and descriptors stay refused.
    AcceptFdsWithBody(u8),
}

/// Descriptors to attach: `count % 10` of them (0 to 9), the `i`-th of the
/// kind `(kinds >> 2 (i % 8)) & 3` (0: a sealed memfd of `len % 64` bytes,
/// 1: a memfd without seals, 2 and 3: the write end of a pipe).
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct FdSet {
    /// How many (mod 10).
    pub count: u8,
    /// Their kinds, two bits each.
    pub kinds: u16,
    /// The sealed memfds' length (mod 64).
    pub len: u8,
}

impl FdSet {
    fn count(&self) -> usize {
        usize::from(self.count) % (MAX_ATTACHED + 1)
    }

    fn kind(&self, i: usize) -> u16 {
        (self.kinds >> (2 * (i % 8))) & 3
    }
}

/// The hub request a [`Operation::CallFds`] carries.
#[derive(Debug, Clone, Arbitrary)]
pub enum FdCall {
    /// `PublishMemfd` on `topic(i)`.
    PublishMemfd(u8),
    /// `Publish` on `topic(i)` (descriptors: `BadMemfd`).
    Publish(u8),
    /// `Status` (descriptors: `BadMemfd`).
    Status,
    /// These bytes as the body (mostly not a hub request).
    BadBody(Vec<u8>),
}

/// Ancillary data that carries no descriptor, with a `Ping`.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Odd {
    /// An `SCM_RIGHTS` message holding no descriptor (the kernel accepts
    /// and drops it).
    EmptyRights,
    /// `SCM_CREDENTIALS` with our own pid, uid and gid (delivered only to a
    /// socket with `SO_PASSCRED`, which the daemon's is not).
    Credentials,
}

/// One client operation.
#[derive(Debug, Clone, Arbitrary)]
pub enum Operation {
    /// The valid handshake.
    Handshake,
    /// The handshake with one bit of the token flipped.
    BadToken {
        /// Token byte.
        byte: u8,
        /// Bit within it.
        bit: u8,
    },
    /// The handshake with another protocol version.
    BadVersion(u32),
    /// The handshake with one magic byte changed.
    BadMagic(u8),
    /// A first-frame length prefix other than 40.
    BadLength(u32),
    /// A well-formed request.
    Request(FuzzRequest),
    /// Arbitrary bytes.
    Raw(Vec<u8>),
    /// From now on, write in pieces of this many bytes (0: whole).
    Split(u8),
    /// Let the server run and read what has arrived.
    Read,
    /// Close our write side; no operation after this is performed.
    Disconnect,
    /// `AcceptFds`; with `true`, nothing more is written until its `Ack`
    /// has arrived (what a client must do before it sends descriptors).
    AcceptFds(bool),
    /// A `CallFds` of `call` with `fds` attached to its first byte,
    /// announcing `announce` descriptors (`None`: as many as attached);
    /// with `split_rights`, the descriptors go as two `SCM_RIGHTS` messages
    /// of one `sendmsg` (which the kernel delivers as one).
    CallFds {
        /// The hub request.
        call: FdCall,
        /// What is attached.
        fds: FdSet,
        /// The count in the frame.
        announce: Option<u8>,
        /// Two control messages instead of one.
        split_rights: bool,
    },
    /// A frame that announces no descriptor (`Status` if the flag is set,
    /// else `Ping`) with `fds` attached.
    Stray(bool, FdSet),
    /// A `Ping` with [`SPRAY`] descriptors attached (one pipe, repeated).
    Spray,
    /// A `Ping` with ancillary data that carries no descriptor.
    OddControl(Odd),
    /// The valid handshake with descriptors attached.
    HandshakeFds(FdSet),
    /// Arbitrary bytes with descriptors attached.
    RawFds(Vec<u8>, FdSet),
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fn with_runtime<T>(f: impl FnOnce(&tokio::runtime::Runtime) -> T) -> T {
    RUNTIME.with(|cell| {
        let mut slot = cell.borrow_mut();
        let rt = slot.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime")
        });
        f(rt)
    })
}

/// What the model expects the server to answer, per request written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// `Ack` (Ping, Shutdown, Expect, AcceptFds).
    Ack(u64),
    /// `Reply`.
    Reply(u64),
    /// `Reply` with `Published`.
    Published(u64),
    /// `Error` with the id.
    Error(u64),
    /// `Error` with the id and this code.
    Code(u64, ErrorCode),
    /// `Reply`, or `Error` with the id (a body that may or may not decode).
    Either(u64),
    /// `Error` with this code and without an id, the last frame.
    Fatal(TransportCode),
}

impl Expect {
    /// Whether `frame` is this answer.
    fn answered_by(&self, frame: &DaemonFrame) -> bool {
        use DaemonFrame as F;
        match (self, frame) {
            (Expect::Ack(id), F::Ack { id: got }) => id == got,
            (Expect::Reply(id), F::Reply { id: got, .. }) => id == got,
            (Expect::Published(id), F::Reply { id: got, body }) => {
                id == got
                    && matches!(
                        crate::encoding::decode::<HubReply>(body),
                        Ok(HubReply::Published { .. })
                    )
            }
            (Expect::Error(id), F::Error(ErrorFrame { id: Some(got), .. })) => id == got,
            (
                Expect::Code(id, code),
                F::Error(ErrorFrame {
                    id: Some(got),
                    code: got_code,
                    ..
                }),
            ) => id == got && code == got_code,
            (Expect::Either(id), F::Reply { id: got, .. })
            | (Expect::Either(id), F::Error(ErrorFrame { id: Some(got), .. })) => id == got,
            (
                Expect::Fatal(code),
                F::Error(ErrorFrame {
                    id: None,
                    code: ErrorCode::Transport(got),
                    ..
                }),
            ) => code == got,
            _ => false,
        }
    }
}

/// `Reply` for a hub request on a valid topic, else `Error InvalidTopic`.
fn reply_or_error(id: u64, topic: &str) -> Expect {
    if valid_topic(topic) {
        Expect::Reply(id)
    } else {
        Expect::Error(id)
    }
}

fn bad_memfd(id: u64) -> Expect {
    Expect::Code(id, ErrorCode::Service(HubError::BAD_MEMFD))
}

/// Decodes the operations from raw fuzzer bytes (never fails: a short input
/// is a short sequence).
pub fn operations(data: &[u8]) -> Vec<Operation> {
    let mut u = Unstructured::new(data);
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS && !u.is_empty() {
        match Operation::arbitrary(&mut u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    ops
}

/// The fuzz target: decodes `data` into operations and runs them.
pub fn session(data: &[u8]) {
    run(&operations(data));
}

/// How the bytes of one operation are sent.
enum Attach {
    /// Plain writes.
    Plain,
    /// These descriptors with the first byte (as two control messages if
    /// the flag is set).
    Rights(Vec<OwnedFd>, bool),
    /// One descriptor, [`SPRAY`] times.
    Spray(OwnedFd),
    /// Ancillary data without descriptors.
    Odd(Odd),
}

/// Whether the daemon has handled this connection's `AcceptFds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accept {
    /// None sent.
    No,
    /// Sent with this id, its `Ack` not seen yet.
    Pending(u64),
    /// Its `Ack` arrived.
    Acked,
}

/// The descriptors of `set`: what to attach, the read ends of the pipes
/// among them (to check for EOF at the end), and whether the first one is a
/// sealed memfd.
fn make_fds(set: &FdSet, pipes: &mut Vec<OwnedFd>) -> (Vec<OwnedFd>, bool) {
    let mut fds = Vec::with_capacity(set.count());
    let mut first_sealed = false;
    for i in 0..set.count() {
        let fd = match set.kind(i) {
            0 => {
                let len = usize::from(set.len % 64);
                let bytes: Vec<u8> = (0..len).map(|b| b as u8).collect();
                if i == 0 {
                    first_sealed = true;
                }
                crate::memfd::create_sealed("fuzz-sealed", &bytes).expect("a sealed memfd")
            }
            1 => {
                let fd = rustix::fs::memfd_create(
                    "fuzz-unsealed",
                    rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
                )
                .expect("a memfd");
                rustix::io::write(&fd, b"x").expect("write to the memfd");
                fd
            }
            _ => pipe(pipes),
        };
        fds.push(fd);
    }
    (fds, first_sealed)
}

/// A pipe: its read end is kept in `pipes`, its write end returned.
fn pipe(pipes: &mut Vec<OwnedFd>) -> OwnedFd {
    let (read, write) = rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    )
    .expect("a pipe");
    pipes.push(read);
    write
}

/// What the daemon answers a `CallFds` that it reads after handling
/// `AcceptFds` (`accepted`) or before, `attached` descriptors with it.
fn call_fds_expect(
    id: u64,
    accepted: bool,
    attached: usize,
    announced: u32,
    call: &FdCall,
    first_sealed: bool,
) -> Expect {
    if !accepted {
        return Expect::Code(
            id,
            ErrorCode::Transport(TransportCode::DescriptorsNotAccepted),
        );
    }
    if attached > MAX_FDS_PER_FRAME || announced == 0 || announced as usize > MAX_FDS_PER_FRAME {
        return Expect::Fatal(TransportCode::TooManyDescriptors);
    }
    if attached != announced as usize {
        return Expect::Fatal(TransportCode::DescriptorMismatch);
    }
    match call {
        FdCall::PublishMemfd(t) if !valid_topic(&topic(*t)) => Expect::Error(id),
        FdCall::PublishMemfd(_) if attached == 1 && first_sealed => Expect::Published(id),
        FdCall::PublishMemfd(_) | FdCall::Publish(_) | FdCall::Status => bad_memfd(id),
        FdCall::BadBody(_) => Expect::Either(id),
    }
}

/// Whether `out` (the daemon's bytes so far) holds an `Ack` with this id.
fn acked(out: &[u8], id: u64) -> bool {
    let mut rest = out;
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let Some(payload) = rest.get(4..4 + len) else {
            return false;
        };
        if let Ok(DaemonFrame::Ack { id: got }) =
            DaemonFrame::decode(&Bytes::copy_from_slice(payload))
        {
            if got == id {
                return true;
            }
        }
        rest = &rest[4 + len..];
    }
    false
}

/// Whether the frames after the handshake in `wire` hold an `AcceptFds`
/// (a payload of exactly the 12-byte header, kind 4), as far as the daemon
/// can have read them in step.
fn sends_accept_fds(wire: &[u8]) -> bool {
    let mut rest = wire.get(HANDSHAKE_FRAME_LEN..).unwrap_or_default();
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > MAX_FRAME_LEN {
            return false;
        }
        let Some(payload) = rest.get(4..4 + len) else {
            return false;
        };
        if len == 12 && payload[8..12] == RequestKind::AcceptFds.tag().to_le_bytes() {
            return true;
        }
        rest = &rest[4 + len..];
    }
    false
}

/// Whether the daemon has handled `AcceptFds` (`None`: it cannot be told
/// yet), for an operation that sends descriptors now.
fn accepted_now(accept: &mut Accept, out: &[u8]) -> Option<bool> {
    match *accept {
        Accept::No => Some(false),
        Accept::Acked => Some(true),
        Accept::Pending(id) if acked(out, id) => {
            *accept = Accept::Acked;
            Some(true)
        }
        Accept::Pending(_) => None,
    }
}

/// One `sendmsg` of `bytes` with `attach`'s ancillary data; `Ok(None)` if
/// the kernel refused the control data itself (`EINVAL`, `EPERM`): then
/// nothing was sent.
fn send_attached(stream: &UnixStream, bytes: &[u8], attach: &Attach) -> io::Result<Option<usize>> {
    let iov = [io::IoSlice::new(bytes)];
    let single: Vec<BorrowedFd<'_>>;
    let spray: Vec<BorrowedFd<'_>>;
    let parts: Vec<&[BorrowedFd<'_>]> = match attach {
        Attach::Plain => Vec::new(),
        Attach::Rights(fds, split) => {
            single = fds.iter().map(AsFd::as_fd).collect();
            if *split && single.len() >= 2 {
                let (a, b) = single.split_at(single.len() / 2);
                vec![a, b]
            } else {
                vec![&single[..]]
            }
        }
        Attach::Spray(fd) => {
            spray = vec![fd.as_fd(); SPRAY];
            vec![&spray[..]]
        }
        Attach::Odd(Odd::EmptyRights) => vec![&[][..]],
        Attach::Odd(Odd::Credentials) => Vec::new(),
    };
    let mut space_len: usize = parts
        .iter()
        .map(|p| rustix::cmsg_space!(ScmRights(p.len())))
        .sum();
    let credentials = matches!(attach, Attach::Odd(Odd::Credentials));
    if credentials {
        space_len += rustix::cmsg_space!(ScmCredentials(1));
    }
    let mut space = vec![MaybeUninit::<u8>::uninit(); space_len];
    let mut control = SendAncillaryBuffer::new(&mut space);
    for part in &parts {
        assert!(control.push(SendAncillaryMessage::ScmRights(part)));
    }
    if credentials {
        let ucred = rustix::net::UCred {
            pid: rustix::process::getpid(),
            uid: rustix::process::getuid(),
            gid: rustix::process::getgid(),
        };
        assert!(control.push(SendAncillaryMessage::ScmCredentials(ucred)));
    }
    match rustix::net::sendmsg(
        stream,
        &iov,
        &mut control,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    ) {
        Ok(n) => Ok(Some(n)),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::PERM) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Writes `bytes` (recorded in `wire`) in pieces of `split` bytes (0:
/// whole), the first piece with one `sendmsg` carrying `attach`'s ancillary
/// data (then the descriptors are closed on our side); `false` if the
/// connection failed.
async fn wire_push(
    wire: &mut Vec<u8>,
    bytes: &[u8],
    writer: &mut tokio::net::unix::WriteHalf<'_>,
    split: usize,
    attach: Attach,
) -> bool {
    wire.extend_from_slice(bytes);
    let piece = if split == 0 {
        bytes.len().max(1)
    } else {
        split
    };
    let mut rest = bytes;
    if !matches!(attach, Attach::Plain) && !bytes.is_empty() {
        let first = &bytes[..piece.min(bytes.len())];
        let stream: &UnixStream = writer.as_ref();
        let sent = loop {
            if stream.writable().await.is_err() {
                return false;
            }
            match stream.try_io(Interest::WRITABLE, || send_attached(stream, first, &attach)) {
                Ok(Some(n)) => break n,
                // Refused by the kernel: sent as plain bytes.
                Ok(None) => break 0,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return false,
            }
        };
        drop(attach);
        rest = &bytes[sent..];
        if split != 0 {
            tokio::task::yield_now().await;
        }
    }
    for chunk in rest.chunks(piece) {
        if writer.write_all(chunk).await.is_err() {
            return false;
        }
        if split != 0 {
            tokio::task::yield_now().await;
        }
    }
    true
}

/// Runs `ops` against a fresh server and checks the invariants.
pub fn run(ops: &[Operation]) {
    let token = fuzz_token();
    let valid = HandshakeFrame::new(&token);
    let mut wire: Vec<u8> = Vec::new();
    let mut sent_ids: Vec<Expect> = Vec::new();
    // Every subscription ever made, by sid, with its pattern (events of an
    // unsubscribed one may still be in flight).
    let mut subscribed: Vec<(u64, String)> = Vec::new();
    let mut live: Vec<u64> = Vec::new();
    let mut served: Vec<String> = Vec::new();
    let mut requested: Vec<u64> = Vec::new();
    // Bytes after the first 44 that the model does not follow (raw bytes,
    // a second handshake), or descriptors sent while it cannot tell whether
    // the daemon has handled `AcceptFds`: only the general invariants hold.
    let mut unmodelled = false;
    let mut shutdown_sent = false;
    let mut accept = Accept::No;
    // The id of the first `AcceptFds` sent, for the check that no frame
    // with descriptors comes before its `Ack`.
    let mut first_accept: Option<u64> = None;
    // The read ends of every pipe whose write end was attached.
    let mut pipes: Vec<OwnedFd> = Vec::new();
    let mut next_id = 1u64;
    let mut split = 0usize;
    let output: RefCell<Vec<u8>> = RefCell::new(Vec::new());
    let done = Cell::new(false);
    let arrived = tokio::sync::Notify::new();

    with_runtime(|rt| {
        rt.block_on(async {
            let server = Server::new(
                HubService::new(),
                ServerConfig::default(),
                Arc::new(fuzz_token()),
            );
            let (mut client, server_end) = UnixStream::pair().expect("socket pair");
            let serving = {
                let server = server.clone();
                tokio::spawn(async move { server.serve_stream(server_end).await })
            };
            let (mut reader, mut writer) = client.split();
            let collect = async {
                let mut chunk = vec![0u8; 16 * 1024];
                loop {
                    match reader.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            output.borrow_mut().extend_from_slice(&chunk[..n]);
                            arrived.notify_one();
                        }
                    }
                }
                done.set(true);
                arrived.notify_one();
            };
            let drive = async {
                for op in ops {
                    let authenticated = wire.len() >= HANDSHAKE_FRAME_LEN
                        && wire[..HANDSHAKE_FRAME_LEN] == valid[..];
                    let mut wait_for_ack = None;
                    let (bytes, expects, attach): (Vec<u8>, Vec<Expect>, Attach) = match op {
                        Operation::Handshake => (valid.to_vec(), Vec::new(), Attach::Plain),
                        Operation::HandshakeFds(set) => {
                            let (fds, _) = make_fds(set, &mut pipes);
                            (valid.to_vec(), Vec::new(), Attach::Rights(fds, false))
                        }
                        Operation::BadToken { byte, bit } => {
                            let mut f = valid.to_vec();
                            f[12 + (*byte as usize % 32)] ^= 1 << (bit % 8);
                            (f, Vec::new(), Attach::Plain)
                        }
                        Operation::BadVersion(v) => (
                            HandshakeFrame::with_version(*v, &token).to_vec(),
                            Vec::new(),
                            Attach::Plain,
                        ),
                        Operation::BadMagic(i) => {
                            let mut f = valid.to_vec();
                            f[4 + (*i as usize % 4)] ^= 0x20;
                            (f, Vec::new(), Attach::Plain)
                        }
                        Operation::BadLength(len) => {
                            let mut f = valid.to_vec();
                            f[..4].copy_from_slice(&len.to_le_bytes());
                            (f, Vec::new(), Attach::Plain)
                        }
                        Operation::Raw(bytes) => (bytes.clone(), Vec::new(), Attach::Plain),
                        Operation::RawFds(bytes, set) => {
                            let (fds, _) = make_fds(set, &mut pipes);
                            (bytes.clone(), Vec::new(), Attach::Rights(fds, false))
                        }
                        Operation::Split(n) => {
                            split = *n as usize;
                            continue;
                        }
                        Operation::Read => {
                            for _ in 0..4 {
                                tokio::task::yield_now().await;
                            }
                            continue;
                        }
                        Operation::Disconnect => break,
                        Operation::Request(req) => {
                            let id = next_id;
                            next_id += 1;
                            let (bytes, expect) = request_frame(
                                id,
                                req,
                                &mut subscribed,
                                &mut live,
                                &mut served,
                                &mut requested,
                            );
                            if matches!(req, FuzzRequest::Shutdown) {
                                shutdown_sent = true;
                            }
                            (bytes, vec![expect], Attach::Plain)
                        }
                        Operation::AcceptFds(wait) => {
                            let id = next_id;
                            next_id += 1;
                            if accept == Accept::No {
                                accept = Accept::Pending(id);
                            }
                            if first_accept.is_none() {
                                first_accept = Some(id);
                            }
                            if *wait && authenticated && !unmodelled {
                                wait_for_ack = Some(id);
                            }
                            let mut f = BytesMut::new();
                            let _ = encode_request::<()>(
                                &mut f,
                                id,
                                RequestKind::AcceptFds,
                                None,
                                MAX_FRAME_LEN,
                            );
                            (f.to_vec(), vec![Expect::Ack(id)], Attach::Plain)
                        }
                        Operation::CallFds {
                            call,
                            fds: set,
                            announce,
                            split_rights,
                        } => {
                            let id = next_id;
                            next_id += 1;
                            let (fds, first_sealed) = make_fds(set, &mut pipes);
                            let announced = announce.map_or(fds.len() as u32, u32::from);
                            let request = match call {
                                FdCall::PublishMemfd(t) => {
                                    Some(HubRequest::PublishMemfd { topic: topic(*t) })
                                }
                                FdCall::Publish(t) => Some(HubRequest::Publish {
                                    topic: topic(*t),
                                    payload: Payload::from(Bytes::from_static(b"fd")),
                                }),
                                FdCall::Status => Some(HubRequest::Status),
                                FdCall::BadBody(_) => None,
                            };
                            let mut f = BytesMut::new();
                            if let Some(request) = &request {
                                let _ =
                                    encode_call_fds(&mut f, id, announced, request, MAX_FRAME_LEN);
                            } else {
                                let body: &[u8] = match call {
                                    FdCall::BadBody(body) => &body[..body.len().min(256)],
                                    _ => &[],
                                };
                                f.extend_from_slice(&((16 + body.len()) as u32).to_le_bytes());
                                f.extend_from_slice(&id.to_le_bytes());
                                f.extend_from_slice(&RequestKind::CallFds.tag().to_le_bytes());
                                f.extend_from_slice(&announced.to_le_bytes());
                                f.extend_from_slice(body);
                            }
                            let expect = match accepted_now(&mut accept, &output.borrow()) {
                                Some(accepted) => call_fds_expect(
                                    id,
                                    accepted,
                                    fds.len(),
                                    announced,
                                    call,
                                    first_sealed,
                                ),
                                None => {
                                    unmodelled = true;
                                    Expect::Either(id)
                                }
                            };
                            (f.to_vec(), vec![expect], Attach::Rights(fds, *split_rights))
                        }
                        Operation::Stray(status, set) => {
                            let id = next_id;
                            next_id += 1;
                            let (fds, _) = make_fds(set, &mut pipes);
                            let (req, answer) = if *status {
                                (FuzzRequest::Status, Expect::Reply(id))
                            } else {
                                (FuzzRequest::Ping, Expect::Ack(id))
                            };
                            let (bytes, _) = request_frame(
                                id,
                                &req,
                                &mut subscribed,
                                &mut live,
                                &mut served,
                                &mut requested,
                            );
                            let expects = match accepted_now(&mut accept, &output.borrow()) {
                                Some(false) => vec![answer],
                                Some(true) if fds.is_empty() => vec![answer],
                                // Like any descriptors, too many belong to
                                // no frame that announces none: its answer,
                                // then the error.
                                Some(true) if fds.len() > MAX_FDS_PER_FRAME => {
                                    vec![answer, Expect::Fatal(TransportCode::TooManyDescriptors)]
                                }
                                Some(true) => {
                                    vec![answer, Expect::Fatal(TransportCode::DescriptorMismatch)]
                                }
                                None => {
                                    unmodelled = true;
                                    vec![answer]
                                }
                            };
                            (bytes, expects, Attach::Rights(fds, false))
                        }
                        Operation::Spray => {
                            let id = next_id;
                            next_id += 1;
                            let fd = pipe(&mut pipes);
                            let (bytes, _) = request_frame(
                                id,
                                &FuzzRequest::Ping,
                                &mut subscribed,
                                &mut live,
                                &mut served,
                                &mut requested,
                            );
                            let expect = match accepted_now(&mut accept, &output.borrow()) {
                                Some(false) => Some(Expect::Ack(id)),
                                Some(true) => None,
                                None => {
                                    unmodelled = true;
                                    Some(Expect::Ack(id))
                                }
                            };
                            let expects = match expect {
                                Some(expect) => vec![expect],
                                None => vec![
                                    Expect::Ack(id),
                                    Expect::Fatal(TransportCode::TooManyDescriptors),
                                ],
                            };
                            (bytes, expects, Attach::Spray(fd))
                        }
                        Operation::OddControl(odd) => {
                            let id = next_id;
                            next_id += 1;
                            let (bytes, _) = request_frame(
                                id,
                                &FuzzRequest::Ping,
                                &mut subscribed,
                                &mut live,
                                &mut served,
                                &mut requested,
                            );
                            (bytes, vec![Expect::Ack(id)], Attach::Odd(*odd))
                        }
                    };
                    if wire.len() + bytes.len() > MAX_WIRE {
                        break;
                    }
                    // After the first 44 bytes only well-formed requests are
                    // modelled; anything else reaching past them (raw bytes, a
                    // second handshake of any kind) makes the rest unmodelled.
                    let modelled_op = !matches!(
                        op,
                        Operation::Handshake
                            | Operation::HandshakeFds(_)
                            | Operation::BadToken { .. }
                            | Operation::BadVersion(_)
                            | Operation::BadMagic(_)
                            | Operation::BadLength(_)
                            | Operation::Raw(_)
                            | Operation::RawFds(..)
                    );
                    if !modelled_op && wire.len() + bytes.len() > HANDSHAKE_FRAME_LEN {
                        unmodelled = true;
                    }
                    sent_ids.extend(expects);
                    if !wire_push(&mut wire, &bytes, &mut writer, split, attach).await {
                        break;
                    }
                    if let Some(id) = wait_for_ack {
                        // Until the `Ack` (or the end of the connection).
                        let waited = tokio::time::timeout(Duration::from_secs(10), async {
                            while !done.get() && !acked(&output.borrow(), id) {
                                arrived.notified().await;
                            }
                        })
                        .await;
                        assert!(waited.is_ok(), "AcceptFds {id} not answered within 10 s");
                        if acked(&output.borrow(), id) {
                            accept = Accept::Acked;
                        }
                    }
                }
                let _ = writer.shutdown().await;
            };
            let ((), ()) = tokio::time::timeout(Duration::from_secs(20), async {
                tokio::join!(collect, drive)
            })
            .await
            .expect("the server neither answered nor closed within 20 s");
            let _ = tokio::time::timeout(Duration::from_secs(20), serving)
                .await
                .expect("connection task ended");
            drop(client);
        })
    });

    // No leak: every descriptor handed to the daemon was closed by the end
    // of the connection (the kernel's, for those it read without ancillary
    // data or never read; the daemon's, for the others).
    assert_closed(&pipes);

    let output = output.into_inner();
    let frames = split_frames(&output);
    let authenticated =
        wire.len() >= HANDSHAKE_FRAME_LEN && wire[..HANDSHAKE_FRAME_LEN] == valid[..];
    if !authenticated {
        // Unauthenticated: exactly one Error frame, no id, then EOF.
        assert_eq!(
            frames.len(),
            1,
            "an unauthenticated peer got {} frames: {frames:?}",
            frames.len()
        );
        match &frames[0] {
            DaemonFrame::Error(ErrorFrame { id: None, .. }) => {}
            other => panic!("an unauthenticated peer got {other:?}"),
        }
        return;
    }
    match frames.first() {
        Some(DaemonFrame::Welcome(welcome)) => assert_eq!(welcome.service, "hub"),
        other => panic!("first frame after a valid handshake: {other:?}"),
    }
    if let Some(pos) = frames.iter().position(|f| {
        matches!(
            f,
            DaemonFrame::Closing(_) | DaemonFrame::Error(ErrorFrame { id: None, .. })
        )
    }) {
        assert_eq!(
            pos,
            frames.len() - 1,
            "frames after Closing or a closing Error: {frames:?}"
        );
    }
    // Frames with descriptors: only to a connection that sent `AcceptFds`,
    // and never a reply (the hub attaches none to its replies).
    let with_fds = frames.iter().position(|f| {
        matches!(
            f,
            DaemonFrame::ReplyFds { .. } | DaemonFrame::EventFds { .. }
        )
    });
    if let Some(pos) = with_fds {
        assert!(
            sends_accept_fds(&wire),
            "a frame with descriptors to a connection that never sent AcceptFds: {:?}",
            frames[pos]
        );
        if let Some(DaemonFrame::ReplyFds { id, .. }) = frames.get(pos) {
            panic!("ReplyFds to {id}: the hub attaches no descriptor to a reply");
        }
    }
    if unmodelled {
        return;
    }
    if let Some(pos) = with_fds {
        let ack = first_accept.and_then(|id| {
            frames
                .iter()
                .position(|f| matches!(f, DaemonFrame::Ack { id: got } if *got == id))
        });
        assert!(
            ack.is_some_and(|ack| ack < pos),
            "a frame with descriptors before the Ack of AcceptFds: {frames:?}"
        );
    }
    // Replies in request order, one per request, each of the expected kind.
    let mut expected = sent_ids.iter();
    let mut answered = 0usize;
    let mut closing = false;
    for frame in &frames[1..] {
        match frame {
            DaemonFrame::Event { stream, body } => {
                match crate::encoding::decode::<HubEvent>(body)
                    .expect("the daemon sends decodable events")
                {
                    HubEvent::Message { topic, .. } => {
                        assert!(
                            subscribed
                                .iter()
                                .any(|(sid, p)| sid == stream && pattern_matches(p, &topic)),
                            "an event of {topic:?} on stream {stream}, which no pattern subscribed as it matches"
                        );
                    }
                    HubEvent::Request { name, .. } => {
                        assert_eq!(*stream, 0);
                        assert!(
                            served.contains(&name),
                            "a request for {name:?}, never served"
                        );
                    }
                    HubEvent::Response { request, .. } => {
                        assert_eq!(*stream, 0);
                        assert!(
                            requested.contains(&request),
                            "a response to {request}, never sent"
                        );
                    }
                    HubEvent::MessageMemfd { topic, .. } => {
                        panic!("a MessageMemfd of {topic:?} in a plain Event frame")
                    }
                }
                continue;
            }
            DaemonFrame::EventFds { stream, fds, body } => {
                assert_eq!(*fds, 1, "a MessageMemfd carries one descriptor");
                match crate::encoding::decode::<HubEvent>(body)
                    .expect("the daemon sends decodable events")
                {
                    HubEvent::MessageMemfd { topic, .. } => assert!(
                        subscribed
                            .iter()
                            .any(|(sid, p)| sid == stream && pattern_matches(p, &topic)),
                        "a memfd of {topic:?} on stream {stream}, which no pattern subscribed as it matches"
                    ),
                    other => panic!("an EventFds that is not a MessageMemfd: {other:?}"),
                }
                continue;
            }
            DaemonFrame::Lagged { stream, .. } => {
                assert!(
                    subscribed.iter().any(|(sid, _)| sid == stream),
                    "Lagged for stream {stream}, never subscribed"
                );
                continue;
            }
            DaemonFrame::Closing(_) => {
                closing = true;
                break;
            }
            _ => {}
        }
        match expected.next() {
            Some(want) => assert!(
                want.answered_by(frame),
                "reply out of order or of the wrong kind: {want:?} was due, got {frame:?}"
            ),
            None => panic!("a reply no request asked for: {frame:?}"),
        }
        answered += 1;
    }
    // Every request up to the first one that closes the connection was
    // answered (the daemon answers every whole request, even after the
    // peer's half-close), unless the daemon closed first (`Closing`).
    if !closing && !shutdown_sent {
        let due = sent_ids
            .iter()
            .position(|e| matches!(e, Expect::Fatal(_)))
            .map_or(sent_ids.len(), |i| i + 1);
        assert_eq!(
            answered,
            due,
            "{answered} answers for {due} requests due: {:?} went unanswered",
            &sent_ids[answered.min(due)..due]
        );
    }
}

/// Panics unless every pipe's write end is closed (its read end sees EOF).
fn assert_closed(pipes: &[OwnedFd]) {
    for (i, read) in pipes.iter().enumerate() {
        let mut byte = [0u8; 1];
        match rustix::io::read(read, &mut byte) {
            Ok(0) => {}
            other => panic!(
                "pipe {i} of {}: its write end, handed to the daemon, is still open after the connection ended ({other:?}): a descriptor leaked",
                pipes.len()
            ),
        }
    }
}

/// The bytes of one well-formed request with this id, and its answer;
/// keeps the model (subscriptions, names served, requests sent).
fn request_frame(
    id: u64,
    req: &FuzzRequest,
    subscribed: &mut Vec<(u64, String)>,
    live: &mut Vec<u64>,
    served: &mut Vec<String>,
    requested: &mut Vec<u64>,
) -> (Vec<u8>, Expect) {
    let (kind, call, expect) = match req {
        FuzzRequest::Ping => (RequestKind::Ping, None, Expect::Ack(id)),
        FuzzRequest::Shutdown => (RequestKind::Shutdown, None, Expect::Ack(id)),
        FuzzRequest::Status => (
            RequestKind::Call,
            Some(HubRequest::Status),
            Expect::Reply(id),
        ),
        FuzzRequest::Subscribe(sid, p, drop) => {
            let sid = u64::from(*sid % 8);
            let pattern = pattern(*p);
            let ok = check_pattern(&pattern).is_ok() && sid != 0 && !live.contains(&sid);
            if ok {
                subscribed.push((sid, pattern.clone()));
                live.push(sid);
            }
            let lag = if *drop {
                Lag::DropOldest
            } else {
                Lag::Disconnect
            };
            (
                RequestKind::Call,
                Some(HubRequest::Subscribe { sid, pattern, lag }),
                if ok {
                    Expect::Reply(id)
                } else {
                    Expect::Error(id)
                },
            )
        }
        FuzzRequest::Unsubscribe(sid) => {
            let sid = u64::from(*sid % 8);
            live.retain(|s| *s != sid);
            (
                RequestKind::Call,
                Some(HubRequest::Unsubscribe { sid }),
                Expect::Reply(id),
            )
        }
        FuzzRequest::Serve(t) => {
            let name = topic(*t);
            let expect = reply_or_error(id, &name);
            if valid_topic(&name) {
                served.push(name.clone());
            }
            (RequestKind::Call, Some(HubRequest::Serve { name }), expect)
        }
        FuzzRequest::Request(t, payload) => {
            requested.push(id);
            let payload = Payload::from(Bytes::from(payload.clone()));
            (
                RequestKind::Call,
                Some(HubRequest::Request {
                    name: topic(*t),
                    timeout_ms: 50,
                    payload,
                }),
                Expect::Either(id),
            )
        }
        FuzzRequest::Respond(token, payload) => {
            let payload = Payload::from(Bytes::from(payload.clone()));
            (
                RequestKind::Call,
                Some(HubRequest::Respond {
                    token: *token % 4,
                    payload,
                }),
                Expect::Either(id),
            )
        }
        FuzzRequest::Publish(t, payload) => {
            let topic = topic(*t);
            let expect = reply_or_error(id, &topic);
            let payload = Payload::from(Bytes::from(payload.clone()));
            (
                RequestKind::Call,
                Some(HubRequest::Publish { topic, payload }),
                expect,
            )
        }
        FuzzRequest::PublishMemfd(t) => (
            RequestKind::Call,
            Some(HubRequest::PublishMemfd { topic: topic(*t) }),
            Expect::Error(id),
        ),
        FuzzRequest::Expect(name, version) => {
            let name = ["hub", "notes", "", "hub2", "HUB"][*name as usize % 5];
            let version = match version % 4 {
                0 => 2,
                1 => 1,
                2 => 3,
                _ => *version,
            };
            let expect = if (name, version) == ("hub", 2) {
                Expect::Ack(id)
            } else {
                Expect::Fatal(TransportCode::WrongService)
            };
            let mut buf = BytesMut::new();
            let _ = encode_request(
                &mut buf,
                id,
                RequestKind::Expect,
                Some(&(name, version)),
                MAX_FRAME_LEN,
            );
            return (buf.to_vec(), expect);
        }
        FuzzRequest::Unknown(kind) => {
            let kind = crate::transport::REQUEST_KINDS + (kind % 1000);
            let mut f = 12u32.to_le_bytes().to_vec();
            f.extend_from_slice(&id.to_le_bytes());
            f.extend_from_slice(&kind.to_le_bytes());
            return (f, Expect::Error(id));
        }
        FuzzRequest::BadBody(body) => {
            let body = &body[..body.len().min(256)];
            let mut f = ((12 + body.len()) as u32).to_le_bytes().to_vec();
            f.extend_from_slice(&id.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            f.extend_from_slice(body);
            return (f, Expect::Either(id));
        }
        FuzzRequest::AcceptFdsWithBody(n) => {
            let body = vec![0u8; 1 + usize::from(*n % 8)];
            let mut f = ((12 + body.len()) as u32).to_le_bytes().to_vec();
            f.extend_from_slice(&id.to_le_bytes());
            f.extend_from_slice(&RequestKind::AcceptFds.tag().to_le_bytes());
            f.extend_from_slice(&body);
            return (
                f,
                Expect::Code(id, ErrorCode::Transport(TransportCode::BadRequest)),
            );
        }
    };
    let mut buf = BytesMut::new();
    let _ = encode_request(&mut buf, id, kind, call.as_ref(), MAX_FRAME_LEN);
    (buf.to_vec(), expect)
}

/// Splits the daemon's output into frames; every byte must belong to a
/// whole, decodable frame.
fn split_frames(mut out: &[u8]) -> Vec<DaemonFrame> {
    let mut frames = Vec::new();
    while !out.is_empty() {
        assert!(
            out.len() >= 4,
            "a truncated length prefix in the daemon's output"
        );
        let len = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) as usize;
        assert!(
            out.len() >= 4 + len,
            "a truncated frame in the daemon's output"
        );
        frames.push(
            DaemonFrame::decode(&Bytes::copy_from_slice(&out[4..4 + len]))
                .expect("the daemon sends decodable frames"),
        );
        out = &out[4 + len..];
    }
    frames
}

/// Seeds for the committed corpus. `arbitrary` has no encoder, so seeds are
/// found by a deterministic search over its input space (a fixed xorshift
/// stream of 96-byte inputs), keeping the first inputs that decode to each
/// interesting shape: valid sessions with several requests, pub/sub,
/// partial writes, and each kind of refused first frame.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    type Shape = (&'static str, usize, fn(&[Operation]) -> bool);
    let requests = |ops: &[Operation]| {
        ops.iter()
            .filter(|o| matches!(o, Operation::Request(_)))
            .count()
    };
    let shapes: Vec<Shape> = vec![
        ("valid-session", 6, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops
                    .iter()
                    .filter(|o| matches!(o, Operation::Request(_)))
                    .count()
                    >= 3
                && !ops.iter().any(|o| matches!(o, Operation::Raw(_)))
        }),
        ("pubsub", 3, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops.iter().any(|o| {
                    matches!(o, Operation::Request(FuzzRequest::Subscribe(sid, p, _))
                        if sid % 8 != 0 && check_pattern(&pattern(*p)).is_ok())
                })
                && ops.iter().any(
                    |o| matches!(o, Operation::Request(FuzzRequest::Publish(t, _)) if t % 7 < 4),
                )
        }),
        ("split-writes", 2, |ops| {
            matches!(ops.first(), Some(Operation::Split(n)) if *n > 0)
                && matches!(ops.get(1), Some(Operation::Handshake))
                && ops.len() > 3
        }),
        ("expect", 2, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops
                    .iter()
                    .any(|o| matches!(o, Operation::Request(FuzzRequest::Expect(..))))
        }),
        ("bad-token", 1, |ops| {
            matches!(ops.first(), Some(Operation::BadToken { .. }))
        }),
        ("bad-version", 1, |ops| {
            matches!(ops.first(), Some(Operation::BadVersion(_)))
        }),
        ("bad-magic", 1, |ops| {
            matches!(ops.first(), Some(Operation::BadMagic(_)))
        }),
        ("bad-length", 1, |ops| {
            matches!(ops.first(), Some(Operation::BadLength(_)))
        }),
        ("request-before-handshake", 1, |ops| {
            matches!(ops.first(), Some(Operation::Request(_)))
                && ops.iter().any(|o| matches!(o, Operation::Handshake))
        }),
        ("disconnect-first", 1, |ops| {
            matches!(ops.first(), Some(Operation::Disconnect))
        }),
        // Descriptors (proto-spec.md section 19).
        ("memfd-publish", 2, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops.iter().skip_while(|o| !matches!(o, Operation::AcceptFds(true))).any(|o| {
                    matches!(o, Operation::CallFds { call: FdCall::PublishMemfd(t), fds, announce, .. }
                        if t % 7 < 4 && fds.count() == 1 && fds.kind(0) == 0
                            && announce.is_none_or(|n| n == 1))
                })
        }),
        ("call-fds-accepted", 3, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops
                    .iter()
                    .skip_while(|o| !matches!(o, Operation::AcceptFds(true)))
                    .any(|o| matches!(o, Operation::CallFds { .. }))
        }),
        ("call-fds-not-accepted", 2, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops
                    .iter()
                    .take_while(|o| !matches!(o, Operation::AcceptFds(_)))
                    .any(|o| matches!(o, Operation::CallFds { .. }))
        }),
        ("stray-fds", 2, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops
                    .iter()
                    .skip_while(|o| !matches!(o, Operation::AcceptFds(true)))
                    .any(|o| matches!(o, Operation::Stray(_, fds) if fds.count() > 0))
        }),
        ("spray", 1, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops
                    .iter()
                    .skip_while(|o| !matches!(o, Operation::AcceptFds(true)))
                    .any(|o| matches!(o, Operation::Spray))
        }),
        ("odd-control", 1, |ops| {
            matches!(ops.first(), Some(Operation::Handshake))
                && ops.iter().any(|o| matches!(o, Operation::OddControl(_)))
        }),
        (
            "handshake-fds",
            1,
            |ops| matches!(ops.first(), Some(Operation::HandshakeFds(fds)) if fds.count() > 0),
        ),
        (
            "raw-fds-first",
            1,
            |ops| matches!(ops.first(), Some(Operation::RawFds(_, fds)) if fds.count() > 0),
        ),
    ];
    let _ = requests;
    let mut found: Vec<(String, Vec<u8>)> = Vec::new();
    let mut counts = vec![0usize; shapes.len()];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..8_000_000 {
        if shapes
            .iter()
            .zip(counts.iter())
            .all(|((_, want, _), got)| got >= want)
        {
            break;
        }
        let mut input = vec![0u8; 96];
        for b in input.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = (state >> 24) as u8;
        }
        let ops = operations(&input);
        for (i, (name, want, matches)) in shapes.iter().enumerate() {
            if counts[i] < *want && matches(&ops) {
                counts[i] += 1;
                found.push((format!("{name}-{}", counts[i]), input.clone()));
                break;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use FuzzRequest as R;
    use Operation as O;

    #[test]
    fn scripted_sessions_hold_the_invariants() {
        let sessions: Vec<Vec<Operation>> = vec![
            vec![O::Handshake, O::Request(R::Ping)],
            vec![
                O::Handshake,
                O::Request(R::Subscribe(1, 0, false)),
                O::Request(R::Publish(0, b"hello".to_vec())),
                O::Read,
                O::Request(R::Unsubscribe(1)),
                O::Request(R::Publish(0, b"gone".to_vec())),
                O::Request(R::Status),
            ],
            vec![
                O::Split(1),
                O::Handshake,
                O::Request(R::Ping),
                O::Request(R::Subscribe(2, 2, true)),
            ],
            vec![
                O::Handshake,
                O::Request(R::Subscribe(3, 3, false)),
                O::Request(R::Subscribe(3, 4, false)),
                O::Request(R::Subscribe(0, 4, false)),
                O::Request(R::Publish(4, vec![1])),
            ],
            // Wildcards: `a.*` and `>` match `a.b`; `a.>.b` is refused.
            vec![
                O::Handshake,
                O::Request(R::Subscribe(1, 4, false)),
                O::Request(R::Subscribe(2, 5, true)),
                O::Request(R::Subscribe(3, 7, false)),
                O::Request(R::Publish(2, b"x".to_vec())),
                O::Request(R::Publish(0, b"y".to_vec())),
                O::Read,
            ],
            // Request/reply with itself: serve, request, answer.
            vec![
                O::Handshake,
                O::Request(R::Serve(0)),
                O::Request(R::Request(0, b"q".to_vec())),
                O::Read,
                O::Request(R::Respond(1, b"r".to_vec())),
                O::Request(R::Request(1, b"nobody".to_vec())),
                O::Read,
            ],
            vec![O::Handshake, O::Request(R::Unknown(0)), O::Request(R::Ping)],
            // Expect: the hub (Ack, then served), then another service
            // (WrongService: nothing after it is answered).
            vec![
                O::Handshake,
                O::Request(R::Expect(0, 0)),
                O::Request(R::Status),
                O::Request(R::Expect(1, 0)),
                O::Request(R::Ping),
            ],
            vec![O::Handshake, O::Request(R::Shutdown), O::Request(R::Ping)],
            vec![O::Request(R::Ping), O::Handshake],
            vec![O::BadToken { byte: 5, bit: 3 }, O::Request(R::Ping)],
            vec![O::BadVersion(1)],
            vec![
                O::Handshake,
                O::Request(R::BadBody(vec![9, 0, 0, 0])),
                O::Request(R::Ping),
            ],
            vec![O::BadMagic(1)],
            vec![O::BadLength(41)],
            vec![
                O::Raw(HandshakeFrame::new(&fuzz_token())[..20].to_vec()),
                O::Disconnect,
            ],
            vec![O::Handshake, O::Raw(vec![0xff, 0xff, 0xff, 0xff])],
            vec![O::Disconnect],
        ];
        for ops in sessions {
            run(&ops);
        }
    }

    /// `count` descriptors of one kind (0: sealed memfd, 1: unsealed
    /// memfd, 2: pipe).
    fn fds(count: u8, kind: u16) -> FdSet {
        FdSet {
            count,
            kinds: kind * 0x5555,
            len: 5,
        }
    }

    fn call_fds(call: FdCall, set: FdSet, announce: Option<u8>) -> Operation {
        O::CallFds {
            call,
            fds: set,
            announce,
            split_rights: false,
        }
    }

    #[test]
    fn scripted_descriptor_sessions_hold_the_invariants() {
        let sessions: Vec<Vec<Operation>> = vec![
            // A sealed memfd published to a subscriber on the same
            // connection, which takes descriptors (EventFds) or not (Event).
            vec![
                O::Handshake,
                O::Request(R::Subscribe(1, 0, false)),
                O::AcceptFds(true),
                call_fds(FdCall::PublishMemfd(0), fds(1, 0), None),
                O::Read,
                O::Request(R::Ping),
            ],
            vec![
                O::Handshake,
                O::Request(R::Subscribe(1, 5, false)),
                O::Request(R::AcceptFdsWithBody(3)),
                call_fds(FdCall::PublishMemfd(0), fds(1, 0), None),
                O::Request(R::Ping),
            ],
            // Refused and the connection stays: an unsealed memfd, a pipe,
            // two descriptors, another request with one, the plain Call.
            vec![
                O::Handshake,
                O::AcceptFds(true),
                call_fds(FdCall::PublishMemfd(1), fds(1, 1), None),
                call_fds(FdCall::PublishMemfd(1), fds(1, 2), None),
                call_fds(FdCall::PublishMemfd(1), fds(2, 0), None),
                call_fds(FdCall::Status, fds(1, 2), None),
                call_fds(FdCall::PublishMemfd(4), fds(1, 0), None),
                O::Request(R::PublishMemfd(0)),
                O::Split(3),
                call_fds(FdCall::Publish(0), fds(3, 2), None),
                O::CallFds {
                    call: FdCall::PublishMemfd(2),
                    fds: fds(4, 2),
                    announce: None,
                    split_rights: true,
                },
                O::OddControl(Odd::EmptyRights),
                O::OddControl(Odd::Credentials),
                O::Request(R::Ping),
            ],
            // Before AcceptFds: refused with the id, whatever the count.
            vec![
                O::Handshake,
                call_fds(FdCall::PublishMemfd(0), fds(1, 2), None),
                call_fds(FdCall::PublishMemfd(0), fds(9, 2), Some(0)),
                O::Stray(false, fds(3, 2)),
                O::Spray,
                O::Request(R::Ping),
            ],
            // After it, each closes: count mismatch, none sent, too many
            // announced, nine sent, 253 sent, stray descriptors.
            vec![
                O::Handshake,
                O::AcceptFds(true),
                call_fds(FdCall::PublishMemfd(0), fds(2, 2), Some(1)),
                O::Request(R::Ping),
            ],
            vec![
                O::Handshake,
                O::AcceptFds(true),
                call_fds(FdCall::PublishMemfd(0), fds(0, 2), Some(1)),
            ],
            vec![
                O::Handshake,
                O::AcceptFds(true),
                call_fds(FdCall::Status, fds(1, 2), Some(9)),
            ],
            vec![
                O::Handshake,
                O::AcceptFds(true),
                call_fds(FdCall::Status, fds(9, 2), None),
            ],
            vec![
                O::Handshake,
                O::AcceptFds(true),
                O::Spray,
                O::Request(R::Ping),
            ],
            vec![O::Handshake, O::AcceptFds(true), O::Stray(true, fds(2, 2))],
            vec![
                O::Handshake,
                O::AcceptFds(true),
                O::Split(2),
                O::Stray(false, fds(8, 2)),
                O::Disconnect,
            ],
            // Descriptors with the handshake, and before it.
            vec![O::HandshakeFds(fds(3, 2)), O::Request(R::Ping)],
            vec![
                O::RawFds(vec![1, 2, 3], fds(2, 2)),
                O::Handshake,
                O::Request(R::Ping),
            ],
            // AcceptFds without waiting for its Ack: unmodelled, but no leak.
            vec![
                O::Handshake,
                O::AcceptFds(false),
                call_fds(FdCall::PublishMemfd(0), fds(1, 2), None),
                O::Request(R::Ping),
            ],
        ];
        for ops in sessions {
            run(&ops);
        }
    }

    /// The leak check sees a descriptor that is kept: a pipe whose write
    /// end is still open somewhere fails it; once closed, it passes.
    #[test]
    fn the_leak_check_sees_a_kept_descriptor() {
        let mut pipes = Vec::new();
        let write = pipe(&mut pipes);
        let kept = std::panic::catch_unwind(|| assert_closed(&pipes));
        assert!(kept.is_err(), "a pipe with its write end open passed");
        drop(write);
        assert_closed(&pipes);
    }

    #[test]
    fn seeds_cover_every_shape() {
        let seeds = seeds();
        for prefix in [
            "valid-session-6",
            "pubsub-3",
            "split-writes-2",
            "expect-1",
            "bad-token-1",
            "bad-version-1",
            "bad-magic-1",
            "bad-length-1",
            "request-before-handshake-1",
            "disconnect-first-1",
            "memfd-publish-2",
            "call-fds-accepted-3",
            "call-fds-not-accepted-2",
            "stray-fds-2",
            "spray-1",
            "odd-control-1",
            "handshake-fds-1",
            "raw-fds-first-1",
        ] {
            assert!(seeds.iter().any(|(n, _)| n == prefix), "no seed {prefix}");
        }
    }
}
