//! One connection, from the peer-credential check to close.
//!
//! 1. Peer credentials (SO_PEERCRED) are checked before any byte is read: a
//!    uid that is not allowed gets `Error PeerNotAllowed`; over the
//!    connection cap, `Error TooManyConnections`.
//! 2. The connection takes a pending slot (possibly evicting another, see
//!    [`super::admission`]) and has the auth deadline to complete the
//!    handshake. Bytes are read at most [`HandshakeParser::wanted`] at a
//!    time into a 44-byte buffer, so nothing past the handshake is consumed
//!    and the pre-auth buffer never exceeds the handshake frame. Any failure
//!    sends one `Error` frame and closes; nothing else ever reaches an
//!    unauthenticated peer.
//! 3. After `Welcome`, requests are read and answered in order. Replies and
//!    events are gathered in one write buffer and written when no more
//!    decoded input is waiting (one syscall for a batch of pipelined
//!    replies). Idle connections hold no read or write buffer. Once the
//!    peer has closed its end, every complete request is still answered,
//!    then the connection ends, even with a partial frame left over. A large
//!    publish is neither copied out of the read buffer nor into the
//!    subscribers' write buffers: its payload bytes are shared and written
//!    with a vectored write (see [`super::hub`]).

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot::error::TryRecvError;
use tracing::debug;
use zeroize::Zeroize;

use super::Shared;
use super::hub::{DIRECT_PAYLOAD, Frame, Outbox, Published};
use crate::codec::{
    DecodeState, FrameCodec, decode_request, decode_request_shared, encode_message,
};
use crate::error::{FrameError, RequestError};
use crate::handshake::{HandshakeParser, Progress, Rejection};
use crate::limits::{
    CLOSE_FLUSH_TIMEOUT, HANDSHAKE_FRAME_LEN, MAX_ERROR_MESSAGE_LEN, READ_CHUNK, WRITE_BATCH_BYTES,
};
use crate::message::{
    CloseReason, ErrorCode, PROTOCOL_VERSION, Request, RequestBody, ServerMessage, valid_topic,
};

/// Why a connection ended (for the close log line).
#[derive(Debug)]
enum End {
    PeerClosed,
    /// The peer closed its end with a frame only partly sent: the rest can
    /// never arrive.
    PeerClosedMidFrame,
    Refused(ErrorCode),
    Closing(CloseReason),
    FrameTooLarge,
    Malformed,
    Io(io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::PeerClosed => f.write_str("peer closed"),
            End::PeerClosedMidFrame => f.write_str("peer closed in the middle of a frame"),
            End::Refused(code) => write!(f, "refused: {code:?}"),
            End::Closing(reason) => write!(f, "closing: {reason:?}"),
            End::FrameTooLarge => f.write_str("frame too large"),
            End::Malformed => f.write_str("malformed request"),
            End::Io(err) => write!(f, "i/o error: {err}"),
        }
    }
}

/// Runs one connection to completion.
pub(crate) async fn run(shared: Arc<Shared>, stream: UnixStream, conn_id: u64) {
    let (uid, pid) = match stream.peer_cred() {
        Ok(cred) => (cred.uid(), cred.pid().unwrap_or(0)),
        Err(err) => {
            debug!(conn = conn_id, error = %err, "connection closed: no peer credentials");
            return;
        }
    };
    debug!(conn = conn_id, pid, uid, "connection opened");
    let mut stream = stream;
    let end = serve(&shared, &mut stream, conn_id, uid, pid).await;
    debug!(conn = conn_id, pid, uid, reason = %end, "connection closed");
}

async fn serve(shared: &Shared, stream: &mut UnixStream, conn_id: u64, uid: u32, pid: i32) -> End {
    if !shared.uid_allowed(uid) {
        return refuse(
            stream,
            ErrorCode::PeerNotAllowed,
            format!("uid {uid} may not use this daemon"),
        );
    }
    let Some(_permit) = shared.admission.try_connection() else {
        return refuse(
            stream,
            ErrorCode::TooManyConnections,
            format!(
                "connection limit of {} reached",
                shared.config.max_connections
            ),
        );
    };
    if let Err((code, message)) = authenticate(shared, stream, conn_id, pid).await {
        return refuse(stream, code, message);
    }
    debug!(conn = conn_id, pid, uid, "connection authenticated");
    shared.authenticated.fetch_add(1, Ordering::AcqRel);
    let mut session = Session {
        shared,
        stream,
        conn_id,
        uid,
        codec: FrameCodec::new(shared.config.max_frame_len),
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        direct: None,
        wake: Vec::new(),
        outbox: None,
        topics: Vec::new(),
        eof: false,
        starved: true,
    };
    // Boxed: the task of a pending connection is sized for the handshake
    // only, not for a session's buffers and waits (memory per pending
    // connection; the box is allocated once the peer has authenticated).
    let end = Box::pin(session.run()).await;
    session.leave_hub();
    shared.authenticated.fetch_sub(1, Ordering::AcqRel);
    end
}

/// Sends one `Error` frame without waiting (the socket buffer of a peer that
/// was sent nothing else always has room for it) and lets the caller close.
fn refuse(stream: &UnixStream, code: ErrorCode, mut message: String) -> End {
    truncate_message(&mut message);
    let mut frame = BytesMut::new();
    if encode_message(
        &ServerMessage::Error {
            id: None,
            code,
            message,
        },
        &mut frame,
        usize::MAX,
    )
    .is_ok()
    {
        let _ = stream.try_write(&frame);
    }
    End::Refused(code)
}

fn truncate_message(message: &mut String) {
    if message.len() > MAX_ERROR_MESSAGE_LEN {
        let mut cut = MAX_ERROR_MESSAGE_LEN;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
}

async fn authenticate(
    shared: &Shared,
    stream: &UnixStream,
    conn_id: u64,
    pid: i32,
) -> Result<(), (ErrorCode, String)> {
    let admitted = shared.admission.admit_pending(conn_id, pid);
    if let Some(victim) = admitted.evicted {
        debug!(
            conn = conn_id,
            pid,
            evicted = victim,
            "pending slots full; evicted the oldest of the top holder"
        );
    }
    let mut slot = admitted.slot;
    let mut parser = HandshakeParser::new();
    let verdict_error = |rejection: Option<Rejection>| match rejection {
        Some(rejection) => (rejection.code(), rejection_message(rejection)),
        None => (
            ErrorCode::HandshakeExpected,
            "connection ended before a complete handshake".into(),
        ),
    };
    // A client sends its handshake as soon as it has connected, so it is
    // usually in the socket by now: read it at once, without waiting for the
    // readiness event or arming the deadline timer (each a wake-up across
    // threads). The checks come in the order of the wait below (shutdown,
    // eviction, then the bytes); anything but a complete handshake goes on
    // to that wait, with the deadline.
    if shared.shutdown.is_cancelled() {
        return Err((
            ErrorCode::ShuttingDown,
            "the daemon is shutting down".into(),
        ));
    }
    if !matches!(slot.evicted.try_recv(), Err(TryRecvError::Empty)) {
        return Err((
            ErrorCode::TooManyUnauthenticated,
            "too many unauthenticated connections; this one was evicted".into(),
        ));
    }
    if let Some(verdict) = read_handshake_now(stream, &mut parser, shared) {
        return verdict.map_err(verdict_error);
    }
    let timeout = shared.config.auth_timeout;
    tokio::select! {
        biased;
        _ = shared.shutdown.cancelled() => Err((ErrorCode::ShuttingDown, "the daemon is shutting down".into())),
        _ = &mut slot.evicted => Err((
            ErrorCode::TooManyUnauthenticated,
            "too many unauthenticated connections; this one was evicted".into(),
        )),
        _ = tokio::time::sleep(timeout) => Err((
            ErrorCode::AuthTimeout,
            format!("no complete handshake within {:.1} s", timeout.as_secs_f64()),
        )),
        verdict = read_handshake(stream, &mut parser, shared) => verdict.map_err(verdict_error),
    }
}

/// The handshake if it can be read completely now, by non-blocking reads
/// straight from the socket, never more than the parser wants. `None`: not
/// all there yet (what was read stays in the parser), or the read would
/// block; the caller then waits as usual.
fn read_handshake_now(
    stream: &UnixStream,
    parser: &mut HandshakeParser,
    shared: &Shared,
) -> Option<Result<(), Option<Rejection>>> {
    let mut buf = [0u8; HANDSHAKE_FRAME_LEN];
    let verdict = loop {
        let want = parser.wanted();
        match rustix::io::read(stream, &mut buf[..want]) {
            Ok(0) => break Some(Err(None)),
            Ok(n) => match parser.feed(&buf[..n]) {
                Ok(Progress::NeedMore { .. }) => {}
                Ok(Progress::Complete { .. }) => {
                    break Some(parser.verify(&shared.token).map_err(Some));
                }
                Err(rejection) => break Some(Err(Some(rejection))),
            },
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => break None,
        }
    };
    buf.zeroize();
    verdict
}

fn rejection_message(rejection: Rejection) -> String {
    match rejection {
        Rejection::WrongLength { got, expected } => format!(
            "the first frame must be the {expected}-byte handshake; its length prefix says {got}"
        ),
        Rejection::BadMagic => "handshake magic is not KYHL".into(),
        Rejection::UnsupportedVersion { got, supported } => {
            format!("protocol version {got} is not supported; this daemon speaks {supported:?}")
        }
        Rejection::BadToken => "the token does not match this daemon's session token".into(),
    }
}

/// Reads the handshake, never more than the parser wants. `Err(None)`: the
/// peer closed or failed before a verdict.
async fn read_handshake(
    stream: &UnixStream,
    parser: &mut HandshakeParser,
    shared: &Shared,
) -> Result<(), Option<Rejection>> {
    let mut buf = [0u8; HANDSHAKE_FRAME_LEN];
    let verdict = loop {
        if stream.readable().await.is_err() {
            break Err(None);
        }
        let want = parser.wanted();
        match stream.try_read(&mut buf[..want]) {
            Ok(0) => break Err(None),
            Ok(n) => match parser.feed(&buf[..n]) {
                Ok(Progress::NeedMore { .. }) => {}
                Ok(Progress::Complete { .. }) => break parser.verify(&shared.token).map_err(Some),
                Err(rejection) => break Err(Some(rejection)),
            },
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => break Err(None),
        }
    };
    buf.zeroize();
    verdict
}

/// An authenticated connection.
struct Session<'a> {
    shared: &'a Shared,
    stream: &'a mut UnixStream,
    conn_id: u64,
    uid: u32,
    codec: FrameCodec,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// A large event being written; goes out before `wbuf`.
    direct: Option<Frame>,
    /// Subscribers that this connection's publishes must wake, once the
    /// batch of requests at hand is handled.
    wake: Vec<Arc<Outbox>>,
    outbox: Option<Arc<Outbox>>,
    topics: Vec<String>,
    eof: bool,
    /// The last [`Session::process_frames`] stopped because no complete
    /// frame was buffered (rather than because a batch of replies was full
    /// or a shutdown began).
    starved: bool,
}

/// Consecutive small publishes on one topic, not yet published.
#[derive(Default)]
struct PublishRun {
    topic: String,
    ids: Vec<u64>,
    payloads: Vec<bytes::Bytes>,
    bytes: usize,
}

/// Bytes of an `Ack` frame, for the write-batch bound while Acks are pending.
const ACK_FRAME_LEN: usize = 16;

/// What handling one request asks of the loop.
enum Next {
    Continue,
    Close(End),
}

impl Session<'_> {
    async fn run(&mut self) -> End {
        let welcome = ServerMessage::Welcome {
            protocol_version: PROTOCOL_VERSION,
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            connection_id: self.conn_id,
            max_frame_len: self.codec.max_frame_len() as u32,
        };
        self.reply(&welcome);
        match self.serve().await {
            Ok(end) => end,
            Err(err) => End::Io(err),
        }
    }

    async fn serve(&mut self) -> io::Result<End> {
        loop {
            if self.shared.shutdown.is_cancelled() {
                return self.close_for_shutdown().await;
            }
            let mut progress = false;

            // Read what is ready, unless enough replies are waiting already.
            if !self.eof && self.wbuf.len() < WRITE_BATCH_BYTES {
                if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK {
                    self.rbuf.reserve(READ_CHUNK);
                }
                match self.stream.read_buf(&mut self.rbuf).now_or_never() {
                    Some(Ok(0)) => {
                        self.eof = true;
                        progress = true;
                    }
                    Some(Ok(_)) => progress = true,
                    Some(Err(err)) => return Err(err),
                    None => {}
                }
            }

            // Answer every complete request buffered, up to a batch, then
            // wake the subscribers its publishes reached.
            let next = self.process_frames();
            for outbox in self.wake.drain(..) {
                outbox.wake();
            }
            match next {
                Next::Continue => {}
                Next::Close(end) => return self.close_after(end).await,
            }

            // Events for this subscriber. An overflow is acted on even while
            // the socket is blocked: that is exactly when it happens.
            // One lock per wake-up: `take_batch` reports the overflow too.
            if let Some(outbox) = &self.outbox {
                let overflowed = if self.wbuf.len() < WRITE_BATCH_BYTES {
                    outbox
                        .take_batch(&mut self.wbuf, WRITE_BATCH_BYTES, &mut self.direct)
                        .overflowed
                } else {
                    outbox.is_overflowed()
                };
                if overflowed {
                    return self.close_with(CloseReason::SlowConsumer).await;
                }
            }

            // One write for everything gathered.
            if let Some(direct) = &mut self.direct {
                let parts = [
                    IoSlice::new(&direct.head),
                    IoSlice::new(&direct.body),
                    IoSlice::new(&self.wbuf),
                ];
                match self.stream.write_vectored(&parts).now_or_never() {
                    Some(Ok(n)) => {
                        let from_direct = n.min(direct.len());
                        direct.advance(from_direct);
                        self.wbuf.advance(n - from_direct);
                        if direct.is_empty() {
                            self.direct = None;
                        }
                        progress |= n > 0;
                    }
                    Some(Err(err)) => return Err(err),
                    None => {}
                }
            } else if !self.wbuf.is_empty() {
                match self.stream.write(&self.wbuf).now_or_never() {
                    Some(Ok(n)) => {
                        self.wbuf.advance(n);
                        progress |= n > 0;
                    }
                    Some(Err(err)) => return Err(err),
                    None => {}
                }
            }
            if self.wbuf.is_empty() && self.wbuf.capacity() > 0 {
                self.wbuf = BytesMut::new();
            }
            // After EOF no byte will arrive: once every complete frame is
            // answered, a partial one left in the buffer can never complete,
            // so the connection ends instead of waiting for nothing (found
            // by both the torture harness and the `session` fuzzer).
            if self.eof && self.wbuf.is_empty() && self.direct.is_none() && self.starved {
                let mid_frame = !self.rbuf.is_empty() || self.codec.state() != DecodeState::Head;
                return Ok(if mid_frame {
                    End::PeerClosedMidFrame
                } else {
                    End::PeerClosed
                });
            }
            if progress {
                continue;
            }

            // Nothing to do without waiting: release the read buffer while
            // idle, then wait for input, room to write, events or shutdown.
            if self.rbuf.is_empty() {
                self.rbuf = BytesMut::new();
            }
            let want_read = !self.eof && self.wbuf.len() < WRITE_BATCH_BYTES;
            let want_write = !self.wbuf.is_empty() || self.direct.is_some();
            let outbox = self.outbox.clone();
            let events = async move {
                match outbox {
                    Some(outbox) => outbox.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.shared.shutdown.cancelled() => {}
                ready = self.stream.writable(), if want_write => ready?,
                ready = self.stream.readable(), if want_read => ready?,
                _ = events => {}
            }
        }
    }

    fn reply(&mut self, msg: &ServerMessage) {
        if self.wbuf.capacity() == 0 {
            self.wbuf.reserve(4096);
        }
        // Replies are small and bounded; the frame limit cannot refuse them.
        let _ = encode_message(msg, &mut self.wbuf, usize::MAX);
    }

    fn reply_error(&mut self, id: Option<u64>, code: ErrorCode, mut message: String) {
        truncate_message(&mut message);
        self.reply(&ServerMessage::Error { id, code, message });
    }

    /// Answers the complete requests buffered, up to a batch. Consecutive
    /// small publishes on one topic are gathered into a run and published
    /// together (see [`super::hub::Hub::publish_many`]); a run is flushed,
    /// its Acks written, before anything else is answered, so replies stay
    /// in request order.
    fn process_frames(&mut self) -> Next {
        self.starved = false;
        let mut run = PublishRun::default();
        let next = self.process_frames_into(&mut run);
        match self.flush_run(&mut run) {
            Next::Continue => next,
            close => close,
        }
    }

    fn process_frames_into(&mut self, run: &mut PublishRun) -> Next {
        while self.wbuf.len() + run.ids.len() * ACK_FRAME_LEN < WRITE_BATCH_BYTES {
            let len = match self.codec.next_payload_len(&mut self.rbuf) {
                Ok(Some(len)) => len,
                Ok(None) => {
                    self.starved = true;
                    break;
                }
                Err(FrameError::FrameTooLarge { len, max }) => {
                    if let Next::Close(end) = self.flush_run(run) {
                        return Next::Close(end);
                    }
                    self.reply_error(
                        None,
                        ErrorCode::FrameTooLarge,
                        format!("frame of {len} bytes is over the limit of {max} bytes"),
                    );
                    return Next::Close(End::FrameTooLarge);
                }
                Err(_) => {
                    let _ = self.flush_run(run);
                    return Next::Close(End::Malformed);
                }
            };
            let request = if len >= DIRECT_PAYLOAD && self.rbuf[8..12] == [4, 0, 0, 0] {
                // A large Publish: its payload stays where it was read.
                decode_request_shared(&self.rbuf.split_to(len).freeze())
            } else {
                let request = decode_request(&self.rbuf[..len]);
                self.rbuf.advance(len);
                request
            };
            let request = match request {
                Ok(Request {
                    id,
                    body: RequestBody::Publish { topic, payload },
                }) if payload.len() < DIRECT_PAYLOAD && valid_topic(&topic) => {
                    if run.topic != topic {
                        if let Next::Close(end) = self.flush_run(run) {
                            return Next::Close(end);
                        }
                        run.topic = topic;
                    }
                    run.ids.push(id);
                    run.bytes += payload.len() + run.topic.len() + 32;
                    run.payloads.push(payload);
                    if run.bytes >= WRITE_BATCH_BYTES {
                        if let Next::Close(end) = self.flush_run(run) {
                            return Next::Close(end);
                        }
                    }
                    if self.shared.shutdown.is_cancelled() {
                        break;
                    }
                    continue;
                }
                other => other,
            };
            if let Next::Close(end) = self.flush_run(run) {
                return Next::Close(end);
            }
            let next = match request {
                Ok(request) => self.handle(request),
                Err(RequestError::Unknown(unknown)) => {
                    self.reply_error(
                        Some(unknown.id),
                        ErrorCode::UnknownRequest,
                        format!("request tag {} is unknown to this daemon", unknown.tag),
                    );
                    Next::Continue
                }
                Err(RequestError::Malformed(why)) => {
                    self.reply_error(
                        None,
                        ErrorCode::Malformed,
                        format!("undecodable request: {why}"),
                    );
                    Next::Close(End::Malformed)
                }
            };
            if let Next::Close(end) = next {
                return Next::Close(end);
            }
            if self.shared.shutdown.is_cancelled() {
                break;
            }
        }
        Next::Continue
    }

    fn handle(&mut self, Request { id, body }: Request) -> Next {
        match body {
            RequestBody::Ping => self.reply(&ServerMessage::Pong { id }),
            RequestBody::Status => {
                let status = self.shared.status();
                self.reply(&ServerMessage::StatusReport { id, status });
            }
            RequestBody::Subscribe { topic } => {
                if !self.check_topic(id, &topic) {
                    return Next::Continue;
                }
                let limit = self.shared.config.outbound_queue_bytes;
                let outbox = self
                    .outbox
                    .get_or_insert_with(|| Arc::new(Outbox::new(limit)));
                if self.shared.hub.subscribe(&topic, self.conn_id, outbox) {
                    self.topics.push(topic);
                }
                self.reply(&ServerMessage::Ack { id });
            }
            RequestBody::Unsubscribe { topic } => {
                if !self.check_topic(id, &topic) {
                    return Next::Continue;
                }
                self.shared.hub.unsubscribe(&topic, self.conn_id);
                self.topics.retain(|t| *t != topic);
                self.reply(&ServerMessage::Ack { id });
            }
            RequestBody::Publish { topic, payload } => return self.publish(id, &topic, payload),
            RequestBody::Shutdown => {
                if self.uid != self.shared.daemon_uid {
                    self.reply_error(
                        Some(id),
                        ErrorCode::NotPermitted,
                        format!(
                            "only uid {} may shut the daemon down",
                            self.shared.daemon_uid
                        ),
                    );
                } else {
                    self.reply(&ServerMessage::Ack { id });
                    tracing::info!(conn = self.conn_id, "shutdown requested by a client");
                    self.shared.begin_shutdown();
                }
            }
        }
        Next::Continue
    }

    /// One publish, answered with Ack (or the error).
    fn publish(&mut self, id: u64, topic: &str, payload: bytes::Bytes) -> Next {
        if !self.check_topic(id, topic) {
            return Next::Continue;
        }
        match self
            .shared
            .hub
            .publish_batched(topic, payload, &mut self.wake)
        {
            Ok(Published::Queued { .. }) => self.reply(&ServerMessage::Ack { id }),
            Ok(Published::ShuttingDown) => self.reply_error(
                Some(id),
                ErrorCode::ShuttingDown,
                "the daemon is shutting down; nothing was published".into(),
            ),
            Err(err) => {
                self.reply_error(Some(id), ErrorCode::FrameTooLarge, err.to_string());
                return Next::Close(End::FrameTooLarge);
            }
        }
        Next::Continue
    }

    /// Publishes a gathered run and writes its Acks; if the run cannot be
    /// published as one (an event over the frame limit), its publishes are
    /// handled one by one, with exactly the replies they would have had.
    fn flush_run(&mut self, run: &mut PublishRun) -> Next {
        if run.ids.is_empty() {
            return Next::Continue;
        }
        let topic = std::mem::take(&mut run.topic);
        let ids = std::mem::take(&mut run.ids);
        let payloads = std::mem::take(&mut run.payloads);
        run.bytes = 0;
        match self
            .shared
            .hub
            .publish_many(&topic, &payloads, &mut self.wake)
        {
            Ok(Published::Queued { .. }) => {
                for id in ids {
                    self.reply(&ServerMessage::Ack { id });
                }
            }
            Ok(Published::ShuttingDown) => {
                for id in ids {
                    self.reply_error(
                        Some(id),
                        ErrorCode::ShuttingDown,
                        "the daemon is shutting down; nothing was published".into(),
                    );
                }
            }
            Err(_) => {
                for (id, payload) in ids.into_iter().zip(payloads) {
                    if let Next::Close(end) = self.publish(id, &topic, payload) {
                        return Next::Close(end);
                    }
                }
            }
        }
        Next::Continue
    }

    fn check_topic(&mut self, id: u64, topic: &str) -> bool {
        if valid_topic(topic) {
            return true;
        }
        self.reply_error(
            Some(id),
            ErrorCode::InvalidTopic,
            format!(
                "topic must be 1 to {} bytes of UTF-8; got {} bytes",
                crate::limits::MAX_TOPIC_LEN,
                topic.len()
            ),
        );
        false
    }

    /// Writes what is gathered (a final error, say) and closes.
    async fn close_after(&mut self, end: End) -> io::Result<End> {
        self.flush_bounded().await;
        Ok(end)
    }

    /// Sends `Closing{reason}` after what is already gathered, and closes.
    async fn close_with(&mut self, reason: CloseReason) -> io::Result<End> {
        self.leave_hub();
        self.reply(&ServerMessage::Closing { reason });
        self.flush_bounded().await;
        Ok(End::Closing(reason))
    }

    /// Shutdown: deliver every event already queued (an Ack'ed publish is
    /// in the outbox by then), then `Closing{Shutdown}`.
    async fn close_for_shutdown(&mut self) -> io::Result<End> {
        if let Some(outbox) = &self.outbox {
            outbox.close();
            if outbox.take(&mut self.wbuf, usize::MAX).overflowed {
                return self.close_with(CloseReason::SlowConsumer).await;
            }
        }
        self.close_with(CloseReason::Shutdown).await
    }

    async fn flush_bounded(&mut self) {
        let direct = self.direct.take().unwrap_or_default();
        let write = async {
            self.stream.write_all(&direct.head).await?;
            self.stream.write_all(&direct.body).await?;
            self.stream.write_all(&self.wbuf).await
        };
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, write).await;
        self.wbuf = BytesMut::new();
    }

    fn leave_hub(&mut self) {
        for topic in self.topics.drain(..) {
            self.shared.hub.unsubscribe(&topic, self.conn_id);
        }
        if let Some(outbox) = &self.outbox {
            outbox.close();
        }
    }
}
