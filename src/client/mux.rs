//! The client's multiplexer: many requests in flight on one connection,
//! replies matched to their callers, events handed to a sink.
//!
//! The connection starts before `Welcome` (section 4 of proto-spec.md):
//! the startup task writes the handshake, an `Expect` naming the service
//! (for a typed client) and the first requests already queued (each at most
//! 1024 bytes) in one write, so the first reply takes one round trip. It
//! then reads the daemon's first frame: `Welcome` opens the connection to
//! every request; a refusal fails every request with the handshake's error
//! (the requests were discarded unread by the daemon), after retrying a
//! busy daemon's refusal on a new connection within the connect timeout.
//!
//! A writer task sends request frames (batches written at once) and a
//! reader task reads daemon frames; they run independently, so a long
//! pipeline cannot deadlock. Requests get ids counting up from the connect
//! options' first id (1 by default; 2^64 - 1 is followed by 0), and a FIFO
//! of outstanding ones: replies come in request order, and each must carry the
//! id of the oldest outstanding request and be of the kind it expects
//! (`Reply` for a call, `Ack` for `Ping`/`Shutdown`, or an `Error` with the
//! id); anything else is a protocol violation and ends the connection.
//!
//! Events are bounded by the event budget: before an event is handed on,
//! the reader takes its size from a semaphore, given back when the
//! application takes the event. When the budget is spent the reader stops
//! reading, so the daemon's slow-consumer policy applies instead of the
//! client's memory growing without bound.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::codec::FramedRead;
use zeroize::Zeroizing;

use super::ClientError;
use super::connect::{check_peer_uid, connect_socket_within};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::codec::FrameCodec;
use crate::error::{DecodeError, FrameError};
use crate::fds::{self, Descriptors, FdReader};
use crate::handshake::HandshakeFrame;
use crate::limits::{
    LENGTH_PREFIX_LEN, MAX_FDS_PER_FRAME, MAX_FRAME_LEN, MIN_FRAME_LEN, WRITE_BATCH_BYTES,
};
use crate::transport::{
    CloseReason, DaemonFrame, ErrorCode, ErrorFrame, PROTOCOL_VERSION, RequestKind, TransportCode,
    Welcome, encode_request,
};

/// The largest request payload that may ride behind the handshake, before
/// `Welcome` announces the limit (the smallest limit a daemon may announce).
pub(crate) const PIPELINED_MAX: usize = MIN_FRAME_LEN;

/// What one received descriptor costs of the event budget.
const DESCRIPTOR_BUDGET_COST: usize = 64 * 1024;

/// Bytes of requests the startup task writes with the handshake at most;
/// the rest wait for `Welcome` (a long pipeline written before the daemon's
/// replies are read could block both sides).
const FIRST_WRITE_REQUESTS: usize = 8 * 1024;

/// A successful answer to a request.
#[derive(Debug)]
pub(crate) enum Answer {
    /// The body of a `Reply` (the service's reply message).
    Reply(Bytes),
    /// A `ReplyFds`: the body and the descriptors that came with it.
    ReplyFds(Bytes, Vec<OwnedFd>),
    /// An `Ack`.
    Ack,
}

/// A received event's share of the event budget; given back on drop.
#[derive(Debug)]
pub struct EventPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl EventPermit {
    /// No share (a second copy of an event whose first copy holds it).
    pub(crate) fn none() -> Self {
        Self(None)
    }
}

/// Where received events go.
pub(crate) trait EventSink: Send + Sync + 'static {
    /// An event's body (the service's event message). An error means the
    /// daemon sent something that is not an event of the service: the
    /// connection ends.
    /// `fds`: the descriptors of an `EventFds` (empty for an `Event`).
    fn deliver(
        &self,
        stream: u64,
        body: Bytes,
        fds: Vec<OwnedFd>,
        permit: EventPermit,
    ) -> Result<(), DecodeError>;
    /// `missed` events of `stream` were dropped by the daemon.
    fn lagged(&self, stream: u64, missed: u64);
    /// The connection is over.
    fn end(&self, error: &dyn Fn() -> ClientError);
}

/// Discards events (a client without a service type).
pub(crate) struct Discard;

impl EventSink for Discard {
    fn deliver(
        &self,
        _stream: u64,
        _body: Bytes,
        _fds: Vec<OwnedFd>,
        _permit: EventPermit,
    ) -> Result<(), DecodeError> {
        Ok(())
    }
    fn lagged(&self, _stream: u64, _missed: u64) {}
    fn end(&self, _error: &dyn Fn() -> ClientError) {}
}

struct Pending {
    id: u64,
    kind: RequestKind,
    reply: oneshot::Sender<Result<Answer, ClientError>>,
}

/// Why the handshake failed: every request fails with this.
#[derive(Debug, Clone)]
enum Refusal {
    /// The daemon's `Error` as its first frame.
    Refused { code: ErrorCode, message: String },
    /// `Welcome` names another service than the one expected.
    WrongService {
        socket: PathBuf,
        expected: &'static str,
        expected_version: u32,
        found: String,
        found_version: u32,
    },
    /// No first frame within the connect timeout.
    Timeout,
}

/// Why the connection is over.
#[derive(Debug, Clone, Default)]
struct Ended {
    refusal: Option<Refusal>,
    reason: Option<CloseReason>,
    fatal: Option<ErrorFrame>,
    protocol: Option<String>,
    /// The event budget, if the reader had stopped for it and the
    /// application had not caught up when the socket ended.
    behind: Option<usize>,
}

impl Ended {
    fn error(&self) -> ClientError {
        match &self.refusal {
            Some(Refusal::Refused { code, message }) => {
                return ClientError::AuthRefused {
                    code: *code,
                    message: message.clone(),
                };
            }
            Some(Refusal::WrongService {
                socket,
                expected,
                expected_version,
                found,
                found_version,
            }) => {
                return ClientError::WrongService {
                    socket: socket.clone(),
                    expected,
                    expected_version: *expected_version,
                    found: found.clone(),
                    found_version: *found_version,
                };
            }
            Some(Refusal::Timeout) => {
                return ClientError::Timeout {
                    what: "the daemon's answer to the handshake",
                };
            }
            None => {}
        }
        if let Some(why) = &self.protocol {
            return ClientError::Protocol(why.clone());
        }
        match &self.fatal {
            Some(fatal) => ClientError::from_error_frame(fatal.clone()),
            None => match (self.reason, self.behind) {
                (None, Some(budget)) => ClientError::FellBehind { budget },
                (reason, _) => ClientError::Closed { reason },
            },
        }
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    pending: VecDeque<Pending>,
    ended: Option<Ended>,
}

/// Where the connection is in its start.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// The handshake is written or about to be; no `Welcome` yet.
    Handshaking,
    /// `Welcome` arrived.
    Open(Arc<Welcome>),
    /// The handshake failed, or the connection ended before `Welcome`.
    Failed,
}

/// What the startup task needs: the connection, what to write first, and
/// how to connect again if a busy daemon refuses it.
pub(crate) struct Startup {
    /// Connected, peer checked, nothing written yet.
    pub stream: UnixStream,
    /// The handshake (zeroized on drop).
    pub handshake: HandshakeFrame,
    /// The service a typed client expects (`Expect` is sent, `Welcome`
    /// checked); `None` for a transport-only client.
    pub expect: Option<(&'static str, u32)>,
    pub socket: PathBuf,
    pub expected_uid: u32,
    /// The connect timeout's end: the daemon's first frame comes by then.
    pub until: Instant,
    /// The id of the connection's first request.
    pub first_id: u64,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A request frame on its way to the writer, with the descriptors that go
/// with its first byte.
pub(crate) struct Outgoing {
    frame: Bytes,
    fds: Option<Descriptors>,
}

/// The sending half, shared by every clone of a client.
pub(crate) struct Mux {
    state: Arc<Mutex<State>>,
    writer: mpsc::UnboundedSender<Outgoing>,
    phase: watch::Receiver<Phase>,
    /// Set when `AcceptFds` is sent: the reader takes ancillary data.
    fds_enabled: Arc<AtomicBool>,
}

impl Mux {
    /// Starts the connection: the startup task (handshake, then reading),
    /// and the writer once `Welcome` is in.
    pub fn start(startup: Startup, budget: usize, sink: Arc<dyn EventSink>) -> Self {
        let mut first = State {
            next_id: startup.first_id,
            ..State::default()
        };
        if startup.expect.is_some() {
            // The `Expect` written with the handshake (id 0) is answered
            // first; nobody waits for its `Ack`.
            first.pending.push_back(Pending {
                id: 0,
                kind: RequestKind::Expect,
                reply: oneshot::channel().0,
            });
        }
        let state = Arc::new(Mutex::new(first));
        let (writer, rx) = mpsc::unbounded_channel();
        let (phase_tx, phase) = watch::channel(Phase::Handshaking);
        let budget = budget.min(Semaphore::MAX_PERMITS).min(u32::MAX as usize);
        let fds_enabled = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(
            startup,
            Arc::clone(&fds_enabled),
            rx,
            Arc::clone(&state),
            phase_tx,
            sink,
            Budget {
                semaphore: Arc::new(Semaphore::new(budget)),
                total: budget as u32,
            },
        ));
        Self {
            state,
            writer,
            phase,
            fds_enabled,
        }
    }

    /// Sends `AcceptFds` (the reader takes ancillary data from now on).
    pub fn accept_fds(
        &self,
    ) -> Result<oneshot::Receiver<Result<Answer, ClientError>>, ClientError> {
        self.fds_enabled.store(true, Ordering::Release);
        self.send(RequestKind::AcceptFds, |dst, max| {
            encode_request::<()>(dst, 0, RequestKind::AcceptFds, None, max)
        })
    }

    /// Whether `AcceptFds` was sent.
    pub fn fds_accepted(&self) -> bool {
        self.fds_enabled.load(Ordering::Acquire)
    }

    /// Sends a `CallFds` built by `encode` (as [`Self::send`]) carrying `fds`.
    pub fn send_with_fds(
        &self,
        encode: impl FnOnce(&mut BytesMut, usize) -> Result<(), FrameError>,
        fds: Descriptors,
    ) -> Result<oneshot::Receiver<Result<Answer, ClientError>>, ClientError> {
        let mut frame = BytesMut::new();
        encode(&mut frame, self.max_frame_len())?;
        self.submit_with(RequestKind::CallFds, frame, Some(fds), |_| {})
    }

    /// The limit of a request frame sent now: the announced one after
    /// `Welcome`, [`PIPELINED_MAX`] before it.
    pub fn max_frame_len(&self) -> usize {
        match &*self.phase.borrow() {
            Phase::Open(welcome) => welcome.max_frame_len as usize,
            _ => PIPELINED_MAX,
        }
    }

    /// The daemon's `Welcome`, once it has arrived.
    pub fn welcome_now(&self) -> Option<Arc<Welcome>> {
        match &*self.phase.borrow() {
            Phase::Open(welcome) => Some(Arc::clone(welcome)),
            _ => None,
        }
    }

    /// Waits for `Welcome` (bounded by the connect timeout: the startup
    /// task gives up then); the handshake's error if it failed.
    pub async fn welcome(&self) -> Result<Arc<Welcome>, ClientError> {
        let mut phase = self.phase.clone();
        let outcome = phase
            .wait_for(|p| !matches!(p, Phase::Handshaking))
            .await
            .map(|p| p.clone());
        match outcome {
            Ok(Phase::Open(welcome)) => Ok(welcome),
            _ => Err(self.ended_error()),
        }
    }

    /// Encodes a request with `encode` (given the limit: the announced one,
    /// or the protocol's ceiling before `Welcome`), waits for `Welcome` if
    /// the frame is too large to ride behind the handshake, and sends it
    /// as [`Self::send_with`] does.
    pub async fn send_when_ready(
        &self,
        kind: RequestKind,
        encode: impl FnOnce(&mut BytesMut, usize) -> Result<(), FrameError>,
        on_id: impl FnOnce(u64),
    ) -> Result<oneshot::Receiver<Result<Answer, ClientError>>, ClientError> {
        let mut frame = BytesMut::new();
        match self.welcome_now() {
            Some(welcome) => encode(&mut frame, welcome.max_frame_len as usize)?,
            None => {
                encode(&mut frame, MAX_FRAME_LEN)?;
                let len = frame.len() - LENGTH_PREFIX_LEN;
                if len > PIPELINED_MAX {
                    let max = self.welcome().await?.max_frame_len as usize;
                    if len > max {
                        return Err(FrameError::FrameTooLarge {
                            len: len as u64,
                            max,
                        }
                        .into());
                    }
                }
            }
        }
        self.submit(kind, frame, on_id)
    }

    /// Sends a request frame built by `encode` (with id 0: the real id is
    /// patched in; the limit is [`Self::max_frame_len`]) and returns where
    /// its answer will arrive.
    pub fn send(
        &self,
        kind: RequestKind,
        encode: impl FnOnce(&mut BytesMut, usize) -> Result<(), FrameError>,
    ) -> Result<oneshot::Receiver<Result<Answer, ClientError>>, ClientError> {
        let mut frame = BytesMut::new();
        encode(&mut frame, self.max_frame_len())?;
        self.submit(kind, frame, |_| {})
    }

    /// Queues an encoded frame, telling `on_id` the request's id before
    /// the frame can reach the daemon (so that whatever answers it later,
    /// an event naming the id, finds its route in place).
    fn submit(
        &self,
        kind: RequestKind,
        frame: BytesMut,
        on_id: impl FnOnce(u64),
    ) -> Result<oneshot::Receiver<Result<Answer, ClientError>>, ClientError> {
        self.submit_with(kind, frame, None, on_id)
    }

    fn submit_with(
        &self,
        kind: RequestKind,
        mut frame: BytesMut,
        fds: Option<Descriptors>,
        on_id: impl FnOnce(u64),
    ) -> Result<oneshot::Receiver<Result<Answer, ClientError>>, ClientError> {
        let (reply, rx) = oneshot::channel();
        let mut st = lock(&self.state);
        if let Some(ended) = &st.ended {
            return Err(ended.error());
        }
        let id = st.next_id;
        // Ids are the client's to choose: 2^64 - 1 is followed by 0.
        st.next_id = id.wrapping_add(1);
        frame[LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + 8].copy_from_slice(&id.to_le_bytes());
        on_id(id);
        // Queued and sent under one lock: the FIFO is in the wire's order.
        let outgoing = Outgoing {
            frame: frame.freeze(),
            fds,
        };
        if self.writer.send(outgoing).is_err() {
            return Err(ClientError::Closed { reason: None });
        }
        st.pending.push_back(Pending { id, kind, reply });
        Ok(rx)
    }

    /// Sends a `Call` whose answer nobody waits for (an unsubscribe from a
    /// `Drop`, say): the reply is read and discarded.
    pub fn send_detached<R: serde::Serialize + ?Sized>(&self, request: &R) {
        let _ = self.send(RequestKind::Call, |dst, max| {
            crate::transport::encode_request(dst, 0, RequestKind::Call, Some(request), max)
        });
    }

    /// Why requests fail now that the connection is over.
    pub fn ended_error(&self) -> ClientError {
        lock(&self.state)
            .ended
            .as_ref()
            .map(Ended::error)
            .unwrap_or(ClientError::Closed { reason: None })
    }
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    mut carry: Option<Outgoing>,
) {
    let mut batch = BytesMut::new();
    loop {
        let first = match carry.take() {
            Some(frame) => frame,
            None => match rx.recv().await {
                Some(frame) => frame,
                None => break,
            },
        };
        let mut next = Some(first);
        while let Some(Outgoing { frame, fds }) = next.take() {
            if let Some(fds) = fds {
                // Its descriptors go with its first byte: what was gathered
                // before it first, then one `sendmsg` from its start.
                if write.write_all(&batch).await.is_err()
                    || write_with_fds(&mut write, &frame, &fds).await.is_err()
                {
                    return;
                }
                batch.clear();
            } else if frame.len() >= WRITE_BATCH_BYTES {
                // Large: written as it is, after what was gathered before it.
                if write.write_all(&batch).await.is_err() || write.write_all(&frame).await.is_err()
                {
                    return;
                }
                batch.clear();
            } else {
                batch.put_slice(&frame);
            }
            if batch.len() < WRITE_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if write.write_all(&batch).await.is_err() {
            return;
        }
        batch.clear();
        if batch.capacity() > WRITE_BATCH_BYTES * 4 {
            batch = BytesMut::new();
        }
    }
    let _ = write.shutdown().await;
}

/// Writes `frame` with `fds` sent along with its first byte.
async fn write_with_fds(
    write: &mut OwnedWriteHalf,
    frame: &[u8],
    fds: &Descriptors,
) -> std::io::Result<()> {
    let stream: &UnixStream = write.as_ref();
    let borrowed: Vec<_> = fds.iter().collect();
    let sent = loop {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            fds::send_with_fds(stream, &[std::io::IoSlice::new(frame)], &borrowed)
        }) {
            Ok(n) => break n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
    };
    write.write_all(&frame[sent..]).await
}

async fn read_loop(
    frames: &mut FramedRead<FdReader, FrameCodec>,
    state: &Mutex<State>,
    sink: &dyn EventSink,
    budget: Budget,
) -> Ended {
    let mut ended = Ended::default();
    while let Some(frame) = frames.next().await {
        // Caught up: the application has taken every event it was given.
        if ended.behind.is_some() && budget.semaphore.available_permits() == budget.total as usize {
            ended.behind = None;
        }
        let frame = match frame {
            Ok(frame) => frame.freeze(),
            Err(FrameError::FrameTooLarge { len, max }) => {
                ended.protocol = Some(format!(
                    "the daemon sent a frame of {len} bytes, over its announced limit of {max}"
                ));
                break;
            }
            Err(_) => break,
        };
        let msg = match DaemonFrame::decode(&frame) {
            Ok(msg) => msg,
            Err(err) => {
                ended.protocol = Some(format!("undecodable frame from the daemon: {err}"));
                break;
            }
        };
        // Where this frame started in the stream, for its descriptors.
        let reader = frames.get_mut();
        let start = reader.consumed;
        reader.consumed += (LENGTH_PREFIX_LEN + frame.len()) as u64;
        let announced = match &msg {
            DaemonFrame::ReplyFds { fds, .. } | DaemonFrame::EventFds { fds, .. } => {
                Some(*fds as usize)
            }
            _ => None,
        };
        let mut received = Vec::new();
        if reader.enabled() {
            let claimed = match announced {
                Some(count) if (1..=MAX_FDS_PER_FRAME).contains(&count) => {
                    reader.inbound.claim(start, count)
                }
                Some(count) => {
                    ended.protocol = Some(format!(
                        "a daemon frame announcing {count} descriptors (1 to {MAX_FDS_PER_FRAME} may come)"
                    ));
                    break;
                }
                None => reader.inbound.check_before(start).map(|()| Vec::new()),
            };
            match claimed {
                Ok(fds) => received = fds,
                Err(err) => {
                    ended.protocol = Some(format!("descriptors from the daemon: {err}"));
                    break;
                }
            }
        } else if announced.is_some() {
            ended.protocol =
                Some("a frame with descriptors, which this client did not accept".into());
            break;
        }
        // An Error whose id presence contradicts its code (section 8):
        // codes that close have none, the others always have one.
        if let DaemonFrame::Error(ErrorFrame { id, code, .. }) = &msg {
            let closes = matches!(code, ErrorCode::Transport(t) if t.closes_connection());
            if id.is_some() == closes {
                ended.protocol = Some(format!(
                    "an Error with code {} {} an id",
                    code.wire(),
                    if closes { "carries" } else { "lacks" }
                ));
                break;
            }
        }
        let (id, answer) = match msg {
            DaemonFrame::Reply { id, body } => (id, Ok(Answer::Reply(body))),
            DaemonFrame::ReplyFds { id, body, .. } => (
                id,
                Ok(Answer::ReplyFds(body, std::mem::take(&mut received))),
            ),
            DaemonFrame::Ack { id } => (id, Ok(Answer::Ack)),
            DaemonFrame::Error(ErrorFrame {
                id: Some(id),
                code,
                message,
            }) => (
                id,
                Err(ClientError::from_error_frame(ErrorFrame {
                    id: Some(id),
                    code,
                    message,
                })),
            ),
            DaemonFrame::Lagged { stream, missed } => {
                // Section 7: a Lagged of stream 0, or of no event, is a
                // protocol error (found by the conformance kit).
                if stream == 0 || missed == 0 {
                    ended.protocol = Some(format!(
                        "a Lagged of stream {stream} reporting {missed} events missed"
                    ));
                    break;
                }
                sink.lagged(stream, missed);
                continue;
            }
            DaemonFrame::Event { stream, body } | DaemonFrame::EventFds { stream, body, .. } => {
                // An event larger than the whole budget takes all of it. A
                // descriptor counts as 64 KiB of it, so that the events held
                // for the application bound the descriptors too (the
                // default budget: 256), not only bytes.
                let cost = frame.len() + received.len() * DESCRIPTOR_BUDGET_COST;
                let want = u32::try_from(cost)
                    .unwrap_or(u32::MAX)
                    .clamp(1, budget.total);
                let permit = match Arc::clone(&budget.semaphore).try_acquire_many_owned(want) {
                    Ok(permit) => permit,
                    Err(_) => {
                        // The application is not taking its events: stop
                        // reading until it does (the daemon's queue for us
                        // fills meanwhile, and it may cut us).
                        ended.behind = Some(budget.total as usize);
                        let Ok(permit) =
                            Arc::clone(&budget.semaphore).acquire_many_owned(want).await
                        else {
                            break;
                        };
                        permit
                    }
                };
                let fds = std::mem::take(&mut received);
                if let Err(err) = sink.deliver(stream, body, fds, EventPermit(Some(permit))) {
                    ended.protocol = Some(format!("the daemon sent an undecodable event: {err}"));
                    break;
                }
                continue;
            }
            DaemonFrame::Closing(reason) => {
                ended.reason = Some(reason);
                break;
            }
            DaemonFrame::Error(fatal) => {
                ended.fatal = Some(fatal);
                break;
            }
            DaemonFrame::Welcome(_) => {
                ended.protocol = Some("a second Welcome".into());
                break;
            }
        };
        let pending = lock(state).pending.pop_front();
        let Some(pending) = pending else {
            ended.protocol = Some(format!("a reply (id {id}) with no request outstanding"));
            break;
        };
        let kind_ok = matches!(
            (&answer, pending.kind),
            (
                Ok(Answer::Reply(_) | Answer::ReplyFds(..)),
                RequestKind::Call | RequestKind::CallFds
            ) | (
                Ok(Answer::Ack),
                RequestKind::Ping
                    | RequestKind::Shutdown
                    | RequestKind::Expect
                    | RequestKind::AcceptFds
            ) | (Err(_), _)
        );
        if pending.id != id || !kind_ok {
            let why = format!(
                "a reply with id {id} ({}) where the reply to request {} ({:?}) was due",
                match &answer {
                    Ok(Answer::Reply(_)) => "Reply",
                    Ok(Answer::ReplyFds(..)) => "ReplyFds",
                    Ok(Answer::Ack) => "Ack",
                    Err(_) => "Error",
                },
                pending.id,
                pending.kind
            );
            let _ = pending.reply.send(Err(ClientError::Protocol(why.clone())));
            ended.protocol = Some(why);
            break;
        }
        let _ = pending.reply.send(answer);
    }
    ended
}

/// Ends the connection: every request outstanding fails with why, and so
/// does every later one.
fn finish(state: &Mutex<State>, sink: &dyn EventSink, ended: Ended) {
    let pending = {
        let mut st = lock(state);
        st.ended = Some(ended.clone());
        std::mem::take(&mut st.pending)
    };
    for p in pending {
        let _ = p.reply.send(Err(ended.error()));
    }
    sink.end(&|| ended.error());
}

/// The connection's life: the handshake (with the first requests), then,
/// after `Welcome`, the writer task and the read loop.
async fn run(
    startup: Startup,
    fds_enabled: Arc<AtomicBool>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    state: Arc<Mutex<State>>,
    phase: watch::Sender<Phase>,
    sink: Arc<dyn EventSink>,
    budget: Budget,
) {
    // The caller queues its first requests right after connecting: let it,
    // so that they go out in the handshake's write.
    tokio::task::yield_now().await;
    match open(startup, &mut rx, fds_enabled).await {
        Ok((mut frames, write, carry, welcome)) => {
            phase.send_replace(Phase::Open(welcome));
            tokio::spawn(write_loop(write, rx, carry));
            let ended = read_loop(&mut frames, &state, &*sink, budget).await;
            finish(&state, &*sink, ended);
        }
        Err(ended) => {
            drop(rx);
            finish(&state, &*sink, *ended);
            phase.send_replace(Phase::Failed);
        }
    }
}

type Opened = (
    FramedRead<FdReader, FrameCodec>,
    OwnedWriteHalf,
    Option<Outgoing>,
    Arc<Welcome>,
);

/// Writes the handshake, the `Expect` and the first requests in one write
/// and reads the daemon's first frame; a busy daemon's refusal is tried
/// again on a new connection (the requests were discarded unread) until
/// the connect timeout.
async fn open(
    startup: Startup,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    fds_enabled: Arc<AtomicBool>,
) -> Result<Opened, Box<Ended>> {
    let Startup {
        stream,
        handshake,
        expect,
        socket,
        expected_uid,
        until,
        first_id: _,
    } = startup;
    // The `Expect` (id 0: its `Ack` is the first answer `read_loop`
    // expects, the pending entry `Mux::start` put first), encoded by the
    // transport's own encoder; it holds nothing secret.
    let mut expect_frame = BytesMut::new();
    if let Some((name, version)) = expect {
        encode_request(
            &mut expect_frame,
            0,
            RequestKind::Expect,
            Some(&(name, version)),
            PIPELINED_MAX,
        )
        .map_err(|err| {
            Box::new(Ended {
                protocol: Some(format!("the Expect cannot be sent: {err}")),
                ..Ended::default()
            })
        })?;
    }
    // One buffer, never grown (a reallocation would leave a copy of the
    // token behind), zeroized when dropped.
    let mut first = Zeroizing::new(Vec::with_capacity(
        handshake.len() + expect_frame.len() + FIRST_WRITE_REQUESTS,
    ));
    first.extend_from_slice(&handshake);
    drop(handshake);
    first.extend_from_slice(&expect_frame);
    let mut carry = None;
    while first.len() < first.capacity() {
        let Ok(outgoing) = rx.try_recv() else { break };
        // (A frame with descriptors needs a `sendmsg` of its own.)
        if outgoing.fds.is_some() || outgoing.frame.len() > first.capacity() - first.len() {
            carry = Some(outgoing);
            break;
        }
        first.extend_from_slice(&outgoing.frame);
    }

    let mut stream = stream;
    let mut pause = Duration::from_millis(5);
    // A busy refusal already had: if the connect timeout runs out during
    // the next attempt, that refusal is what happened (not a timeout).
    let mut last_refused: Option<Box<Ended>> = None;
    loop {
        let (read, mut write) = stream.into_split();
        let mut frames = FramedRead::new(
            FdReader::new(read, Arc::clone(&fds_enabled)),
            FrameCodec::new(MAX_FRAME_LEN),
        );
        // A refused write still leaves the daemon's error to read.
        let _ = write.write_all(&first).await;
        let answer = match tokio::time::timeout_at(until.into(), frames.next()).await {
            Err(_) => {
                return Err(last_refused.unwrap_or_else(|| {
                    Box::new(Ended {
                        refusal: Some(Refusal::Timeout),
                        ..Ended::default()
                    })
                }));
            }
            Ok(None | Some(Err(_))) => return Err(Box::default()),
            Ok(Some(Ok(frame))) => frame.freeze(),
        };
        let refusal = match DaemonFrame::decode(&answer) {
            Ok(DaemonFrame::Welcome(welcome)) => {
                let welcome = check_welcome(welcome, expect, &socket)?;
                frames.get_mut().consumed = (LENGTH_PREFIX_LEN + answer.len()) as u64;
                frames
                    .decoder_mut()
                    .set_max_frame_len(welcome.max_frame_len as usize);
                return Ok((frames, write, carry, Arc::new(welcome)));
            }
            // Only the codes a pending connection can get (section 4:
            // 0 to 7 and 13); any other first Error is a protocol error.
            Ok(DaemonFrame::Error(ErrorFrame {
                id: None,
                code: code @ ErrorCode::Transport(transport),
                message,
            })) if transport.tag() <= 7 || transport == TransportCode::ShuttingDown => {
                Refusal::Refused { code, message }
            }
            Ok(other) => {
                return Err(Box::new(Ended {
                    protocol: Some(format!("expected Welcome, got {other:?}")),
                    ..Ended::default()
                }));
            }
            Err(err) => {
                return Err(Box::new(Ended {
                    protocol: Some(format!("undecodable frame from the daemon: {err}")),
                    ..Ended::default()
                }));
            }
        };
        let busy = matches!(
            refusal,
            Refusal::Refused {
                code: ErrorCode::Transport(
                    TransportCode::TooManyConnections | TransportCode::TooManyUnauthenticated
                ),
                ..
            }
        );
        let refused = Box::new(Ended {
            refusal: Some(refusal),
            ..Ended::default()
        });
        if !busy || Instant::now() + pause >= until {
            return Err(refused);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
        let left = until.saturating_duration_since(Instant::now());
        stream = match connect_socket_within(&socket, left).await {
            Ok(stream) if check_peer_uid(&stream, &socket, expected_uid).is_ok() => stream,
            _ => return Err(refused),
        };
        last_refused = Some(refused);
    }
}

/// The transport fields of `Welcome` first, then the service expected.
fn check_welcome(
    welcome: Welcome,
    expect: Option<(&'static str, u32)>,
    socket: &std::path::Path,
) -> Result<Welcome, Box<Ended>> {
    let protocol = |why: String| {
        Box::new(Ended {
            protocol: Some(why),
            ..Ended::default()
        })
    };
    if welcome.protocol_version != PROTOCOL_VERSION {
        return Err(protocol(format!(
            "Welcome announces protocol version {}; this client speaks {PROTOCOL_VERSION}",
            welcome.protocol_version
        )));
    }
    let limit = welcome.max_frame_len as usize;
    if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&limit) {
        return Err(protocol(format!(
            "Welcome announces a frame limit of {limit} bytes, outside {MIN_FRAME_LEN}..={MAX_FRAME_LEN}"
        )));
    }
    if let Some((name, version)) = expect {
        if welcome.service != name || welcome.service_version != version {
            return Err(Box::new(Ended {
                refusal: Some(Refusal::WrongService {
                    socket: socket.to_path_buf(),
                    expected: name,
                    expected_version: version,
                    found: welcome.service,
                    found_version: welcome.service_version,
                }),
                ..Ended::default()
            }));
        }
    }
    Ok(welcome)
}

/// The event budget: a semaphore of bytes, and its size.
struct Budget {
    semaphore: Arc<Semaphore>,
    total: u32,
}

impl ClientError {
    pub(crate) fn from_error_frame(frame: ErrorFrame) -> Self {
        match frame.code {
            ErrorCode::Service(code) => ClientError::Service {
                code,
                message: frame.message,
            },
            ErrorCode::Transport(code) => ClientError::Daemon {
                id: frame.id,
                code,
                message: frame.message,
            },
        }
    }
}
