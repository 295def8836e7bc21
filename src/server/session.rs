//! One authenticated connection, after `Welcome`: requests read and
//! answered in order, events written as they are queued, until either side
//! closes or the daemon shuts down.
//!
//! - Reads are non-blocking and batched: every complete request buffered is
//!   answered (up to [`WRITE_BATCH_BYTES`] of replies) before one write
//!   sends the replies and the events queued meanwhile. Idle connections
//!   hold no read or write buffer.
//! - A frame's length is checked against the limit before room is made for
//!   it ([`peek_frame`]); a request of at least [`SHARE_MIN`] bytes is
//!   decoded from shared bytes, so a large [`crate::Payload`] in it is never
//!   copied.
//! - A request's transport header decides: `Ping` and `Shutdown` are
//!   answered here; a `Call`'s body is decoded as the service's request and
//!   offered first to [`Service::call_batch`], then to [`Service::call`]. A
//!   handler that awaits holds up only this connection, and this
//!   connection's events are still written meanwhile.
//! - Replies never pass a frame limit check silently: a reply over the limit
//!   is answered with `Error Internal` carrying the request's id.
//! - Once the peer has closed its end, every complete request is still
//!   answered, then the connection ends, even with a partial frame left.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io::{self, IoSlice, IoSliceMut};
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use tracing::{debug, info, warn};

use super::connection::{Connection, Inner, WakeList};
use super::outbox::Outbox;
use super::socket::{self, SEND_FLAGS, Socket, send_parts};
use super::{Core, ServerHandle};
use std::os::fd::OwnedFd;

use crate::codec::{Peeked, peek_frame};
use crate::encoding::{self, SHARE_MIN};
use crate::error::DecodeError;
use crate::fds::{self, Attachment, Descriptors, FdError, Inbound};
use crate::limits::MAX_FDS_PER_FRAME;
use crate::limits::{CLOSE_FLUSH_TIMEOUT, LENGTH_PREFIX_LEN, READ_CHUNK, WRITE_BATCH_BYTES};
use crate::service::{Batch, Call, Interface, ReplyOf, RequestOf, Service, ServiceError};
use crate::transport::{
    CloseReason, EncodedEvent, ErrorCode, REQUEST_HEADER_LEN, RequestHeader, RequestKind,
    TransportCode, encode_ack, encode_closing, encode_error, encode_reply, encode_reply_fds,
};

use super::connection::Peer;

/// The first size of a write buffer after idling.
const SMALL_BUFFER: usize = 1000;

/// Bytes of the first read after idling, read into the worker's scratch
/// buffer: a batch of pipelined requests comes in one read (with 1 KiB on
/// the stack, 64 pings took two reads, a second buffer and a copy).
const FIRST_READ: usize = READ_CHUNK;

/// Requests handled per unit of tokio's cooperative task budget (128 units
/// a poll): a connection yields its worker after about 512 requests.
const REQUESTS_PER_BUDGET_UNIT: u32 = 4;

/// Why a connection ended (for the close log line).
#[derive(Debug)]
pub(crate) enum End {
    PeerClosed,
    /// The peer closed its end with a frame only partly sent.
    PeerClosedMidFrame,
    Closing(CloseReason),
    FrameTooLarge,
    Malformed,
    OverBudget,
    /// An `Expect` named another service.
    WrongService,
    /// Descriptors that belong to no frame, or too many.
    Descriptors,
    Io(io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::PeerClosed => f.write_str("peer closed"),
            End::PeerClosedMidFrame => f.write_str("peer closed in the middle of a frame"),
            End::Closing(reason) => write!(f, "closing: {reason:?}"),
            End::FrameTooLarge => f.write_str("frame too large"),
            End::Malformed => f.write_str("malformed request"),
            End::OverBudget => f.write_str("cut: the memory budget is used up"),
            End::WrongService => f.write_str("the client expects another service"),
            End::Descriptors => f.write_str("file descriptors out of order or too many"),
            End::Io(err) => write!(f, "i/o error: {err}"),
        }
    }
}

/// Runs an authenticated connection to its end; `ahead`: what the
/// handshake's read took past the handshake (requests written with it),
/// `drained`: that read found the socket empty after them.
///
/// (The session is set up before the `async move` block, which then holds
/// it once: an `async fn` keeps each argument and each local held across an
/// await in its state, which every connection holds.)
pub(crate) fn run<'a, S: Service>(
    core: &'a Arc<Core>,
    service: &'a S,
    stream: &'a mut Socket,
    peer: Peer,
    conn_id: u64,
    ahead: BytesMut,
    drained: bool,
) -> impl Future<Output = End> + Send + 'a {
    core.budget.start_enforcer(&core.registry);
    let inner = Arc::new(Inner {
        id: conn_id,
        peer,
        outbox: Outbox::new(core.config.outbound_queue_bytes, Arc::clone(&core.budget)),
        max_frame_len: core.config.max_frame_len,
        share: Default::default(),
        accepts_fds: Default::default(),
    });
    let connection = Connection::<S::Interface>::from_inner(Arc::clone(&inner));
    let state = service.open(&connection);
    core.registry.insert(&inner);
    let mut session = Session {
        core,
        service,
        handle: ServerHandle::from_core(Arc::clone(core)),
        connection,
        stream,
        state: Some(state),
        requests: Requests::new(core.config.max_frame_len, ahead),
        wake: WakeList::new(),
        direct: None,
        reply_fds: None,
        eof: false,
        drained,
    };
    async move { session.run().await }
}

struct Session<'a, S: Service> {
    core: &'a Arc<Core>,
    service: &'a S,
    handle: ServerHandle<S::Interface>,
    connection: Connection<S::Interface>,
    stream: &'a mut Socket,
    /// `Some` until handed back to [`Service::close`].
    state: Option<S::Session>,
    requests: Requests<S>,
    /// Connections this connection's handlers pushed to, to wake once the
    /// batch of requests at hand is handled.
    wake: WakeList,
    /// An event with a shared part being written; goes out before `wbuf`
    /// (boxed: rare, and 120 bytes of every connection otherwise).
    direct: Option<Box<EncodedEvent>>,
    /// Descriptors the handler at hand attached to its reply.
    reply_fds: Option<Descriptors>,
    eof: bool,
    /// The handshake's read found the socket empty after what it took:
    /// nothing to read before the first wait (cleared there).
    drained: bool,
}

/// What the next buffered frame is: 16 bytes, moved by value from the
/// frame's decoding to its handling. A call's request waits in
/// [`Requests::decoded`]: carried in the item, it made the item as large as
/// the service's largest request (80 bytes for the hub), copied three times
/// a frame (~55 of the ~207 instructions of a pipelined ping,
/// `.ci/callgrind.sh` ping64).
enum Item {
    /// A call; its request is in [`Requests::decoded`].
    Call(u64),
    /// A call whose descriptors wait in the connection's [`Inbound`] (kept
    /// out of the item, which every frame moves: a `Vec` in it cost every
    /// request); its request is in [`Requests::decoded`].
    CallFds(u64),
    AcceptFds(u64),
    Ping(u64),
    Shutdown(u64),
    /// Answered with an error carrying the id; the connection stays open.
    /// (Boxed, like [`Item::Fatal`]: rare, and the message allocates anyway.)
    Refused(Box<Refusal>),
    /// Answered with an error without id; the connection closes.
    Fatal(Box<FatalFrame>),
}

/// A request answered with an error; the connection stays open.
struct Refusal {
    id: u64,
    code: TransportCode,
    message: String,
}

/// A frame that closes the connection after its error.
struct FatalFrame {
    code: TransportCode,
    message: String,
    end: fn() -> End,
}

impl Item {
    fn refused(id: u64, code: TransportCode, message: String) -> Self {
        Item::Refused(Box::new(Refusal { id, code, message }))
    }

    fn fatal(code: TransportCode, message: String, end: fn() -> End) -> Self {
        Item::Fatal(Box::new(FatalFrame { code, message, end }))
    }
}

/// The reading and replying half of a session: the read buffer, the replies gathered, and the lookahead [`Batch`] uses.
pub struct Requests<S: Service> {
    rbuf: BytesMut,
    /// Bytes at the front of `rbuf` already taken as frames: dropped with
    /// one `advance` when the batch ends ([`Self::compact`]), not one per
    /// frame (~40 instructions each).
    rpos: usize,
    wbuf: BytesMut,
    max_frame_len: usize,
    /// A frame decoded ahead (by [`Batch::peek`]) and not yet handled.
    stash: Option<Item>,
    /// The request of the [`Item::Call`] or [`Item::CallFds`] last decoded
    /// (the stash's, if it holds one), until it is handled.
    decoded: Option<RequestOf<S>>,
    /// A large frame arriving into a buffer of its own (boxed: rare, and
    /// 48 bytes of every connection otherwise).
    large: Option<Box<LargeFrame>>,
    /// Ids of requests a batch took and has not answered yet.
    owed: VecDeque<u64>,
    /// Requests a batch took, answered or not.
    taken: usize,
    /// The last decode found no complete frame.
    starved: bool,
    /// Bytes read from the socket so far.
    read_total: u64,
    /// Where in the stream the next frame starts (for the descriptors).
    consumed: u64,
    /// Set by `AcceptFds`: reads take ancillary data.
    inbound: Option<Box<Inbound>>,
    /// Descriptors to send with frames in `wbuf`.
    wfds: VecDeque<Attachment>,
    stop_peeking: bool,
    _service: PhantomData<fn(&S)>,
}

impl<S: Service> Requests<S> {
    /// Requests starting with the bytes already read (`ahead`).
    fn new(max_frame_len: usize, ahead: BytesMut) -> Self {
        Self {
            read_total: ahead.len() as u64,
            rbuf: ahead,
            rpos: 0,
            wbuf: BytesMut::new(),
            max_frame_len,
            stash: None,
            decoded: None,
            large: None,
            owed: VecDeque::new(),
            taken: 0,
            starved: true,
            consumed: 0,
            inbound: None,
            wfds: VecDeque::new(),
            stop_peeking: false,
            _service: PhantomData,
        }
    }

    /// The next buffered frame, decoded; `None` when no whole frame is there.
    ///
    /// Inlined, with [`Self::classify`] and [`Session::handle_frame`], into
    /// the loop of [`Session::process_frames`]: out of line, each frame's
    /// [`Item`] (as large as the service's largest request) was built and
    /// moved by value through three calls, each with its own stack frame to
    /// set up; inlined, a pipelined ping costs 270 instructions instead of
    /// 333 (`.ci/callgrind.sh`, ping64).
    #[inline(always)]
    fn next_item(&mut self) -> Option<Item> {
        // (Tested first: `take` moves the whole `Option` out and back, about
        // ten instructions a frame for a stash that is nearly always empty.)
        if self.stash.is_some() {
            return self.stash.take();
        }
        if let Some(large) = self.large.take_if(|large| large.buf.len() >= large.len) {
            let frame = large.buf.freeze();
            let inbound = self.inbound.as_deref_mut();
            return Some(Self::classify(
                &frame,
                Some(&frame),
                inbound,
                large.start,
                &mut self.decoded,
            ));
        }
        if let Some(large) = &self.large {
            let start = large.start;
            return self.starve(start);
        }
        let len = match peek_frame(&self.rbuf[self.rpos..], self.max_frame_len) {
            Ok(Peeked::Whole(len)) if len < SHARE_MIN => len,
            Ok(Peeked::Whole(len)) => {
                self.compact();
                len
            }
            Ok(Peeked::NoPrefix) => return self.starve(self.consumed),
            // A large frame still arriving gets a buffer of its own, of
            // exactly its size (the limit is checked first): the payloads
            // shared out of it then pin nothing but the frame, however large
            // the read buffer once grew.
            Ok(Peeked::Partial(len)) if len >= SHARE_MIN => {
                self.compact();
                self.rbuf.advance(LENGTH_PREFIX_LEN);
                let start = self.consumed;
                self.consumed += (LENGTH_PREFIX_LEN + len) as u64;
                let mut buf = BytesMut::with_capacity(len);
                buf.extend_from_slice(&self.rbuf);
                self.rbuf.clear();
                self.large = Some(Box::new(LargeFrame { buf, len, start }));
                return self.starve(start);
            }
            // Room for the rest of a small frame, made only now that its
            // length is known to be within the limit.
            Ok(Peeked::Partial(len)) => {
                self.compact();
                self.rbuf.reserve(LENGTH_PREFIX_LEN + len - self.rbuf.len());
                return self.starve(self.consumed);
            }
            // (`peek_frame` fails only for a length over the limit.)
            Err(err) => {
                return Some(Item::fatal(
                    TransportCode::FrameTooLarge,
                    err.to_string(),
                    || End::FrameTooLarge,
                ));
            }
        };
        let start = self.consumed;
        let frame_len = LENGTH_PREFIX_LEN + len;
        self.consumed += frame_len as u64;
        let inbound = self.inbound.as_deref_mut();
        if len >= SHARE_MIN {
            // A large frame that arrived whole: shared if the buffer is not
            // much larger than it (what a shared payload pins), else copied.
            self.rbuf.advance(LENGTH_PREFIX_LEN);
            let frame: Bytes = if self.rbuf.capacity() <= 2 * len {
                self.rbuf.split_to(len).freeze()
            } else {
                let frame = Bytes::copy_from_slice(&self.rbuf[..len]);
                self.rbuf.advance(len);
                frame
            };
            return Some(Self::classify(
                &frame,
                Some(&frame),
                inbound,
                start,
                &mut self.decoded,
            ));
        }
        // A small frame: decoded in place, consumed when the batch ends.
        let at = self.rpos;
        let item = Self::classify(
            &self.rbuf[at + LENGTH_PREFIX_LEN..at + frame_len],
            None,
            inbound,
            start,
            &mut self.decoded,
        );
        self.rpos = at + frame_len;
        Some(item)
    }

    /// Drops the frames taken from the front of the read buffer.
    fn compact(&mut self) {
        if self.rpos > 0 {
            self.rbuf.advance(self.rpos);
            self.rpos = 0;
        }
    }

    /// No whole frame is buffered; the next one starts at byte `next` of
    /// the stream. `None`, unless the descriptors held can belong to no
    /// frame any more ([`Inbound::check_pending`]): then the fatal error.
    fn starve(&mut self, next: u64) -> Option<Item> {
        self.compact();
        if let Some(inbound) = self.inbound.as_deref_mut() {
            if let Err(err) = inbound.check_pending(next) {
                return Some(fd_fatal(&err));
            }
        }
        self.starved = true;
        None
    }

    /// What a request frame's payload is; with `shared`, the same payload as
    /// [`Bytes`], so that large payloads in it are sliced, not copied. On a
    /// connection that accepts descriptors, `inbound` has those received and
    /// `start` is where the frame starts in the stream. A call's request goes
    /// to `decoded`. (Inlined: see [`Self::next_item`].)
    #[inline(always)]
    fn classify(
        payload: &[u8],
        shared: Option<&Bytes>,
        mut inbound: Option<&mut Inbound>,
        start: u64,
        decoded: &mut Option<RequestOf<S>>,
    ) -> Item {
        if let Some(inbound) = inbound.as_deref_mut() {
            if let Err(err) = inbound.check_before(start) {
                return fd_fatal(&err);
            }
        }
        let header = match RequestHeader::parse(payload) {
            Ok(header) => header,
            Err(err) => {
                return Item::fatal(TransportCode::Malformed, err.to_string(), || End::Malformed);
            }
        };
        let id = header.id;
        let body_len = payload.len() - REQUEST_HEADER_LEN;
        match RequestKind::from_tag(header.kind) {
            Some(RequestKind::Call) => {
                let request = match shared {
                    Some(frame) => {
                        encoding::decode_shared::<RequestOf<S>>(&frame.slice(REQUEST_HEADER_LEN..))
                    }
                    None => encoding::decode::<RequestOf<S>>(&payload[REQUEST_HEADER_LEN..]),
                };
                match request {
                    Ok(request) => {
                        *decoded = Some(request);
                        Item::Call(id)
                    }
                    Err(err) => {
                        Item::refused(id, TransportCode::BadRequest, bad_request::<S>(&err))
                    }
                }
            }
            Some(kind @ (RequestKind::Ping | RequestKind::Shutdown)) if body_len > 0 => {
                Item::refused(
                    id,
                    TransportCode::BadRequest,
                    format!("{kind:?} carries no body; this one has {body_len} bytes"),
                )
            }
            Some(RequestKind::Ping) => Item::Ping(id),
            Some(RequestKind::Shutdown) => Item::Shutdown(id),
            Some(RequestKind::Expect) => expect::<S>(id, &payload[REQUEST_HEADER_LEN..]),
            Some(RequestKind::AcceptFds) if body_len > 0 => Item::refused(
                id,
                TransportCode::BadRequest,
                format!("AcceptFds carries no body; this one has {body_len} bytes"),
            ),
            Some(RequestKind::AcceptFds) => Item::AcceptFds(id),
            Some(RequestKind::CallFds) => {
                call_fds::<S>(id, payload, shared, inbound, start, decoded)
            }
            None => Item::refused(
                id,
                TransportCode::UnknownRequest,
                format!("request kind {} is unknown to this daemon", header.kind),
            ),
        }
    }

    /// Where the next bytes from the socket go.
    /// (After [`Self::compact`]: `read_some` makes it first.)
    fn read_target(&mut self) -> &mut BytesMut {
        read_target(&mut self.large, &mut self.rbuf)
    }

    /// See [`Batch::peek`].
    pub(crate) fn peek(&mut self) -> Option<&RequestOf<S>> {
        if self.stash.is_none() {
            if self.stop_peeking || self.wbuf.len() + self.owed.len() * 64 >= WRITE_BATCH_BYTES {
                return None;
            }
            self.stash = self.next_item();
        }
        match &self.stash {
            Some(Item::Call(_)) => self.decoded.as_ref(),
            _ => None,
        }
    }

    /// See [`Batch::buffered_bytes`].
    pub(crate) fn buffered(&self) -> usize {
        self.rbuf.len() - self.rpos
    }

    /// See [`Batch::peek`].
    pub(crate) fn take(&mut self) -> Option<RequestOf<S>> {
        if !matches!(self.stash, Some(Item::Call(_))) {
            self.peek()?;
        }
        // `peek` returned a request: the stash holds a call.
        let Some(Item::Call(id)) = self.stash else {
            return None;
        };
        let request = self.decoded.take()?;
        self.stash = None;
        self.owed.push_back(id);
        self.taken += 1;
        Some(request)
    }

    /// See [`Batch::reply`].
    pub(crate) fn reply(&mut self, result: Result<ReplyOf<S>, S::Error>) {
        match self.owed.pop_front() {
            Some(id) => self.answer(id, result),
            None => warn!("a service's call_batch replied to more requests than it took"),
        }
    }

    /// As [`Self::answer`], the reply carrying `fds` (a `ReplyFds`).
    fn answer_with(
        &mut self,
        id: u64,
        result: Result<ReplyOf<S>, S::Error>,
        fds: Option<Descriptors>,
    ) {
        match (fds, result) {
            (Some(fds), Ok(reply)) => self.answer_fds(id, &reply, &fds),
            // (An error carries no descriptors: they are closed.)
            (_, result) => self.answer(id, result),
        }
    }

    /// A `ReplyFds`; kept out of the common path.
    #[cold]
    fn answer_fds(&mut self, id: u64, reply: &ReplyOf<S>, fds: &Descriptors) {
        self.reserve_write();
        let at = self.wbuf.len();
        let written = if self.inbound.is_none() {
            Err("the connection has not sent AcceptFds".to_owned())
        } else {
            encode_reply_fds(
                &mut self.wbuf,
                id,
                fds.len() as u32,
                reply,
                self.max_frame_len,
            )
            .map_err(|err| err.to_string())
        };
        match written {
            Ok(()) => self.wfds.push_back(Attachment {
                at,
                fds: fds.clone(),
            }),
            Err(err) => {
                warn!(id, error = %err, "a reply with descriptors could not be sent");
                encode_error(
                    &mut self.wbuf,
                    Some(id),
                    TransportCode::Internal.into(),
                    &format!("the reply could not be sent: {err}"),
                );
            }
        }
    }

    /// Writes the reply (or the error) to request `id`.
    fn answer(&mut self, id: u64, result: Result<ReplyOf<S>, S::Error>) {
        self.reserve_write();
        match result {
            Ok(reply) => {
                if let Err(err) = encode_reply(&mut self.wbuf, id, &reply, self.max_frame_len) {
                    warn!(id, error = %err, "a reply could not be sent");
                    encode_error(
                        &mut self.wbuf,
                        Some(id),
                        TransportCode::Internal.into(),
                        &format!("the reply could not be sent: {err}"),
                    );
                }
            }
            Err(err) => encode_error(
                &mut self.wbuf,
                Some(id),
                ErrorCode::Service(err.code()),
                &err.to_string(),
            ),
        }
    }

    fn refuse(&mut self, id: Option<u64>, code: TransportCode, message: &str) {
        self.reserve_write();
        encode_error(&mut self.wbuf, id, code.into(), message);
    }

    fn reserve_write(&mut self) {
        if self.wbuf.capacity() == 0 {
            // Small enough for the allocator's per-thread cache (glibc's
            // tcache holds chunks up to 1 KiB): a connection that writes a
            // few replies and goes idle again, the common case, costs a
            // cached allocation, not a 4 KiB one from the heap (~700
            // instructions each way). A batch that needs more grows it.
            // Pipelined requests are answered in one batch: room for twice
            // the bytes still buffered behind this one (an `Ack` is as long
            // as its `Ping`), so that 64 of them do not grow the buffer on
            // the way (the growth was a `realloc` a batch).
            // (A new buffer, not `reserve` on the empty one: that goes
            // through `BytesMut::reserve_inner` and `RawVec`'s growth path,
            // ~100 instructions more an allocation.)
            self.wbuf =
                BytesMut::with_capacity(SMALL_BUFFER.max(2 * self.buffered().min(READ_CHUNK)));
        }
    }

    /// Whether a partial frame is left (after the peer closed).
    fn mid_frame(&self) -> bool {
        self.rbuf.len() > self.rpos || self.large.is_some()
    }
}

/// Where the next bytes from the socket go: the large frame arriving, or
/// the read buffer.
fn read_target<'b>(
    large: &'b mut Option<Box<LargeFrame>>,
    rbuf: &'b mut BytesMut,
) -> &'b mut BytesMut {
    match large {
        // (Never more than the frame: a whole one is taken before the
        // next read.)
        Some(large) if large.buf.len() < large.len => &mut large.buf,
        _ => {
            // (A buffer sized for the first read is grown to full size
            // when it has little room left.)
            let capacity = rbuf.capacity();
            if capacity - rbuf.len() < (capacity / 4).clamp(1, READ_CHUNK) {
                rbuf.reserve(READ_CHUNK);
            }
            rbuf
        }
    }
}

/// A read into `iov` that, when it comes back short of `iov`, also marks
/// the socket not readable (tokio's readiness, for the readiness event
/// the read began with): the socket is drained, so the next read waits
/// for the next readiness instead of a `recvfrom` that finds nothing, one
/// system call fewer a request when requests come one at a time (as for
/// Redis: one read, one write, one `epoll_wait`). Data arriving meanwhile
/// is a new readiness event, which the clearing does not touch. A read cut
/// short by descriptors the kernel dropped (`MSG_CTRUNC`: a stream read
/// stops after them, with more possibly queued) clears nothing. (A peer
/// that sends out-of-band data, which the protocol has no use for, can
/// make a read stop short the same way, unseen: its later bytes then wait
/// for its next write. Only its own connection waits.)
///
/// `ready`: whether tokio's readiness was set, that is whether the read was
/// made at all (a new socket's readiness is not known until the event loop
/// reports it: the handshake's first read then goes straight to the socket).
pub(super) fn read_draining(
    stream: &Socket,
    iov: &mut [IoSliceMut<'_>],
    ready: &mut bool,
) -> io::Result<usize> {
    read_draining_cleared(stream, iov, ready).map(|(n, _)| n)
}

/// [`read_draining`], also telling whether the readiness was cleared (the
/// socket is known to be empty: nothing is to be read before the event loop
/// reports new input).
fn read_draining_cleared(
    stream: &Socket,
    iov: &mut [IoSliceMut<'_>],
    ready: &mut bool,
) -> io::Result<(usize, bool)> {
    let room = iov.iter().map(|buf| buf.len()).sum::<usize>();
    let mut got = 0;
    let mut emptied = false;
    *ready = false;
    let read = stream.try_read_io(|fd| {
        *ready = true;
        let (bytes, cut) = socket::recv_data(fd, iov)?;
        got = bytes;
        if bytes > 0 && bytes < room && !cut {
            // (Reported as `WouldBlock` so that `try_io` clears the
            // readiness; the bytes are returned below.)
            emptied = true;
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(bytes)
        }
    });
    match read {
        Err(_) if emptied => Ok((got, true)),
        other => other.map(|n| (n, false)),
    }
}

/// The fatal error for descriptors that cannot be handed to a frame.
fn fd_fatal(err: &FdError) -> Item {
    let code = match err {
        FdError::Truncated => TransportCode::TooManyDescriptors,
        FdError::Unannounced { .. } | FdError::Missing { .. } => TransportCode::DescriptorMismatch,
    };
    Item::fatal(code, err.to_string(), || End::Descriptors)
}

/// A `CallFds`: the count after the header, the descriptors that came with
/// the frame, then the service's request.
fn call_fds<S: Service>(
    id: u64,
    payload: &[u8],
    shared: Option<&Bytes>,
    inbound: Option<&mut Inbound>,
    start: u64,
    decoded: &mut Option<RequestOf<S>>,
) -> Item {
    const BODY_AT: usize = REQUEST_HEADER_LEN + 4;
    let Some(count) = payload.get(REQUEST_HEADER_LEN..BODY_AT) else {
        return Item::refused(
            id,
            TransportCode::BadRequest,
            "CallFds carries a u32 count of descriptors after its header".to_owned(),
        );
    };
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    let Some(inbound) = inbound else {
        return Item::refused(
            id,
            TransportCode::DescriptorsNotAccepted,
            "this connection has not sent AcceptFds: its descriptors were closed unread".to_owned(),
        );
    };
    if count == 0 || count > MAX_FDS_PER_FRAME {
        return Item::fatal(
            TransportCode::TooManyDescriptors,
            format!(
                "a CallFds carries 1 to {MAX_FDS_PER_FRAME} descriptors; this one announces {count}"
            ),
            || End::Descriptors,
        );
    }
    let fds = match inbound.claim(start, count) {
        Ok(fds) => fds,
        Err(err) => return fd_fatal(&err),
    };
    let request = match shared {
        Some(frame) => encoding::decode_shared::<RequestOf<S>>(&frame.slice(BODY_AT..)),
        None => encoding::decode::<RequestOf<S>>(&payload[BODY_AT..]),
    };
    match request {
        Ok(request) => {
            inbound.hold_claimed(fds);
            *decoded = Some(request);
            Item::CallFds(id)
        }
        // (The descriptors are closed as `fds` drops.)
        Err(err) => Item::refused(id, TransportCode::BadRequest, bad_request::<S>(&err)),
    }
}

/// An `Expect`: `Ack` (as for a ping) when `body` names this daemon's
/// service and version, else the connection closes with `WrongService`.
fn expect<S: Service>(id: u64, body: &[u8]) -> Item {
    let name = <S::Interface as Interface>::NAME;
    let version = <S::Interface as Interface>::VERSION;
    // The one encoding of (name, version): compared without decoding.
    let n = name.len();
    if body.len() == 8 + n + 4
        && body[..8] == (n as u64).to_le_bytes()
        && &body[8..8 + n] == name.as_bytes()
        && body[8 + n..] == version.to_le_bytes()
    {
        return Item::Ping(id);
    }
    match encoding::decode::<(String, u32)>(body) {
        Ok((wanted, wanted_version)) => Item::fatal(
            TransportCode::WrongService,
            format!(
                "this daemon serves {name} version {version}, not {wanted} version {wanted_version}"
            ),
            || End::WrongService,
        ),
        Err(err) => Item::refused(
            id,
            TransportCode::BadRequest,
            format!("Expect carries a service name and version: {err}"),
        ),
    }
}

fn bad_request<S: Service>(err: &DecodeError) -> String {
    let i = <S::Interface as Interface>::NAME;
    let v = <S::Interface as Interface>::VERSION;
    format!("not a request of service {i} v{v}: {err}")
}

/// A frame of at least [`SHARE_MIN`] bytes still arriving, in a buffer of
/// exactly its size.
struct LargeFrame {
    buf: BytesMut,
    /// Its payload length (the buffer's capacity).
    len: usize,
    /// Where in the stream the frame starts (for the descriptors).
    start: u64,
}

/// What handling the buffered frames asks of the loop.
enum Next {
    Continue,
    Close(End),
}

/// What [`Session::handle_frame`] leaves to do after a frame.
enum Step<F> {
    /// On to the next frame.
    Next,
    /// No more frames in this batch (a shutdown began).
    Stop,
    /// Close the connection.
    Close(End),
    /// Await the service's handler.
    Call(Pin<Box<F>>),
}

impl<S: Service> Session<'_, S> {
    /// Serves the connection, then gives back what it held.
    async fn run(&mut self) -> End {
        // (The outcome of the encoding is not held across the wait.)
        let end = if self.encode_welcome() {
            match self.serve().await {
                Ok(end) => end,
                Err(err) => End::Io(err),
            }
        } else {
            End::Malformed
        };
        // Everything it held is given back (its outbox, when the last handle
        // to it goes).
        let inner = &self.connection.inner;
        self.core
            .budget
            .release(inner.share.inbound.swap(0, Ordering::AcqRel));
        inner.outbox.close();
        self.core.registry.remove(inner.id);
        if let Some(state) = self.state.take() {
            // Boxed: a service's close runs once, and its future would size
            // every connection's state.
            Box::pin(self.service.close(state, &self.connection)).await;
        }
        end
    }

    /// `Welcome`, first in the write buffer (not kept in the session's
    /// state while it runs); `false` if it cannot be encoded.
    fn encode_welcome(&mut self) -> bool {
        self.requests.reserve_write();
        match (self.core.welcome).encode(&mut self.requests.wbuf, self.connection.id()) {
            Ok(()) => true,
            Err(err) => {
                warn!(error = %err, "cannot encode Welcome");
                false
            }
        }
    }

    /// Reads what the socket holds now, without waiting (`WouldBlock` if
    /// nothing), and whether the read emptied the socket (so that nothing
    /// is to be read before the event loop reports more). Without a read
    /// buffer (idle), it reads into the worker's scratch buffer first: a
    /// wake-up for events, or the end of the connection, then allocates
    /// nothing, and requests get a buffer of their size; a full first read
    /// goes on into a larger one.
    fn read_ready(&mut self) -> io::Result<(usize, bool)> {
        let read = self.read_some()?;
        self.requests.read_total += read.0 as u64;
        Ok(read)
    }

    fn read_some(&mut self) -> io::Result<(usize, bool)> {
        self.requests.compact();
        if self.requests.inbound.is_some() {
            // Descriptors accepted: every read is a `recvmsg`.
            let stream: &Socket = self.stream;
            let Requests {
                inbound,
                large,
                rbuf,
                ..
            } = &mut self.requests;
            let target = read_target(large, rbuf);
            let room = target.capacity() - target.len();
            return match inbound.as_deref_mut() {
                Some(inbound) => stream
                    .try_read_io(|fd| inbound.read(fd, target, room))
                    .map(|n| (n, false)),
                None => Ok((0, false)),
            };
        }
        // (Whether the readiness was set does not matter here: nothing was
        // read if it was not.)
        let mut ready = false;
        let stream: &Socket = self.stream;
        if self.requests.rbuf.capacity() > 0 || self.requests.large.is_some() {
            let target = self.requests.read_target();
            let room = (target.capacity() - target.len()).max(1);
            return socket::with_scratch(room, |buf| {
                let (n, cleared) =
                    read_draining_cleared(stream, &mut [IoSliceMut::new(buf)], &mut ready)?;
                target.extend_from_slice(&buf[..n]);
                Ok((n, cleared))
            });
        }
        let rbuf = &mut self.requests.rbuf;
        socket::with_scratch(FIRST_READ, |first| {
            let (n, cleared) =
                read_draining_cleared(stream, &mut [IoSliceMut::new(first)], &mut ready)?;
            if n > 0 {
                // (Idle: `rbuf` has no capacity. A new buffer: see
                // `Requests::reserve_write`.)
                *rbuf = BytesMut::with_capacity(if n == FIRST_READ { n + READ_CHUNK } else { n });
                rbuf.extend_from_slice(&first[..n]);
            }
            Ok((n, cleared))
        })
    }

    fn outbox(&self) -> &Outbox {
        &self.connection.inner.outbox
    }

    async fn serve(&mut self) -> io::Result<End> {
        loop {
            if self.core.is_shutting_down() {
                return Box::pin(self.close_for_shutdown()).await;
            }
            if self.connection.inner.share.cut.load(Ordering::Acquire) {
                return Box::pin(self.close_over_budget()).await;
            }
            let mut progress = false;
            let mut read = false;
            // Input may be waiting that this pass did not read.
            let mut unread = false;

            // Read what is ready, unless enough replies are waiting already.
            if !self.eof && !self.drained {
                if self.requests.wbuf.len() < WRITE_BATCH_BYTES {
                    match self.read_ready() {
                        Ok((0, _)) => {
                            self.eof = true;
                            progress = true;
                        }
                        Ok((_, emptied)) => (progress, read, unread) = (true, true, !emptied),
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(err) => return Err(err),
                    }
                } else {
                    unread = true;
                }
            }

            // Answer every complete request buffered, up to a batch, then
            // wake the connections its handlers pushed to.
            let next = self.process_frames().await;
            self.requests.compact();
            self.account_inbound();
            if self.core.budget.is_over() {
                // Over the budget by what this connection read: cut now,
                // not when the enforcer task next runs (on one thread that
                // is after every connection ready has read on), then let a
                // connection cut run and free its buffers before reading on.
                if !self.core.budget.cut_now(&self.connection.inner) {
                    continue;
                }
                tokio::task::yield_now().await;
            } else if read && self.requests.large.is_some() {
                // A large frame arriving completes no request, so the
                // requests' budget units are not spent: a unit a read, so
                // that a fast writer of a 16 MiB frame does not keep the
                // thread from the other connections.
                tokio::task::consume_budget().await;
            }
            for inner in self.wake.drain(..) {
                inner.outbox.wake();
            }
            if let Next::Close(end) = next {
                return Box::pin(self.close_after(end)).await;
            }

            // Events for this connection. An overflow is acted on even while
            // the socket is blocked: that is exactly when it happens.
            if self.take_events() {
                return Box::pin(self.close_with(CloseReason::SlowConsumer)).await;
            }

            // One write for everything gathered.
            progress |= self.write_now()?;
            if self.requests.wbuf.is_empty() && self.requests.wbuf.capacity() > 0 {
                self.requests.wbuf = BytesMut::new();
            }
            // After EOF no byte will arrive: once every complete frame is
            // answered, a partial one can never complete.
            if self.eof
                && self.requests.wbuf.is_empty()
                && self.direct.is_none()
                && self.requests.starved
            {
                return Ok(if self.requests.mid_frame() {
                    End::PeerClosedMidFrame
                } else {
                    End::PeerClosed
                });
            }
            // Another pass only if it could find something: after a read
            // that emptied the socket, every whole request answered, every
            // reply and event written, it would only find all of that again
            // (~600 instructions a request, one at a time). What arrives
            // meanwhile wakes the wait below at once.
            if progress
                && (unread
                    || self.eof
                    || !self.requests.starved
                    || !self.requests.wbuf.is_empty()
                    || self.direct.is_some()
                    || !self.outbox().is_quiet())
            {
                continue;
            }

            // Nothing to do without waiting: release the read buffer while
            // idle, then wait for input, room to write, events or shutdown.
            if self.requests.rbuf.is_empty() && self.requests.rbuf.capacity() > 0 {
                self.requests.rbuf = BytesMut::new();
                self.account_inbound();
            }
            let want_read = !self.eof && self.requests.wbuf.len() < WRITE_BATCH_BYTES;
            let want_write = !self.requests.wbuf.is_empty() || self.direct.is_some();
            // (No shutdown future here: `begin_shutdown` wakes the outbox of
            // every registered connection, and the loop checks the flag. A
            // cancellation future polled at every wait cost ~190
            // instructions a poll.)
            // (Readiness polled in place: the `readable()`/`writable()`
            // futures took ~100 bytes each of every connection's state.)
            self.drained = false;
            if want_write {
                self.stream.watch_writable()?;
            } else {
                self.stream.unwatch_writable();
            }
            let stream: &Socket = self.stream;
            tokio::select! {
                biased;
                ready = poll_fn(|cx| stream.poll_write_ready(cx)), if want_write => ready?,
                ready = poll_fn(|cx| stream.poll_read_ready(cx)), if want_read => ready?,
                _ = self.connection.inner.outbox.notified() => {}
            }
        }
    }

    /// Brings this connection's inbound share of the memory budget up to
    /// date: its read buffer and the buffer of a large frame arriving.
    fn account_inbound(&mut self) {
        let now = self.requests.rbuf.capacity()
            + self
                .requests
                .large
                .as_ref()
                .map_or(0, |large| large.buf.capacity())
            + self.requests.inbound.as_ref().map_or(0, |i| i.footprint());
        let share = &self.connection.inner.share.inbound;
        let before = share.swap(now, Ordering::AcqRel);
        if now > before {
            self.core.budget.charge(now - before);
        } else {
            self.core.budget.release(before - now);
        }
    }

    /// Cut by the memory budget's enforcer: `Error OverBudget` after what is
    /// gathered, and close.
    async fn close_over_budget(&mut self) -> io::Result<End> {
        let held = self
            .connection
            .inner
            .share
            .held_when_cut
            .load(Ordering::Acquire);
        self.requests.refuse(
            None,
            TransportCode::OverBudget,
            &format!(
                "the daemon's memory budget of {} bytes is used up and this connection held the most ({held} bytes)",
                self.core.budget.limit()
            ),
        );
        self.requests.rbuf = BytesMut::new();
        self.requests.rpos = 0;
        self.requests.large = None;
        self.account_inbound();
        self.flush_bounded().await;
        Ok(End::OverBudget)
    }

    /// Moves queued events into the write buffer; `true` if the outbox
    /// overflowed (the connection must be cut).
    fn take_events(&mut self) -> bool {
        let outbox = &self.connection.inner.outbox;
        if self.requests.wbuf.len() < WRITE_BATCH_BYTES {
            outbox
                .take(
                    &mut self.requests.wbuf,
                    WRITE_BATCH_BYTES,
                    &mut self.direct,
                    &mut self.requests.wfds,
                )
                .overflowed
        } else {
            outbox.is_overflowed()
        }
    }

    /// Writes what is gathered without waiting; `true` if anything was written.
    fn write_now(&mut self) -> io::Result<bool> {
        write_gathered(
            self.stream,
            &mut self.direct,
            &mut self.requests.wbuf,
            &mut self.requests.wfds,
        )
    }

    /// Answers the complete requests buffered, up to a batch of replies.
    async fn process_frames(&mut self) -> Next {
        self.requests.starved = false;
        let mut handled = 0u32;
        while self.requests.wbuf.len() < WRITE_BATCH_BYTES {
            if self.core.is_shutting_down() {
                break;
            }
            // Every few requests are a unit of the task's cooperative
            // budget: a connection with thousands of requests pipelined
            // yields its worker thread every so often instead of keeping it
            // for milliseconds while other connections wait. (One unit per
            // request cost ~30 instructions of a ~500-instruction ping.
            // Spent before the frame is decoded: a frame held across this
            // await was copied into the session's state, ~10 instructions.)
            if handled % REQUESTS_PER_BUDGET_UNIT == 0 {
                tokio::task::consume_budget().await;
            }
            let Some(item) = self.requests.next_item() else {
                break;
            };
            handled = handled.wrapping_add(1);
            match self.handle_frame(item) {
                Step::Next => {}
                Step::Stop => break,
                Step::Close(end) => return Next::Close(end),
                Step::Call(call) => call.await,
            }
        }
        Next::Continue
    }

    /// Handles one frame; a call for [`Service::call`] comes back as its
    /// future, boxed. (Decided in a plain function, so that nothing of the
    /// frame stays in the connection's state while a handler runs; boxed, so
    /// that a handler's future does not size the state of every
    /// connection, idle or not. Inlined: see [`Requests::next_item`].)
    #[inline(always)]
    fn handle_frame(&mut self, item: Item) -> Step<impl Future<Output = ()> + '_> {
        let (id, fds) = match item {
            Item::Call(id) => (id, Vec::new()),
            Item::CallFds(id) => {
                let fds = self
                    .requests
                    .inbound
                    .as_deref_mut()
                    .map(Inbound::take_claimed)
                    .unwrap_or_default();
                (id, fds)
            }
            Item::AcceptFds(id) => {
                if self.requests.inbound.is_none() {
                    self.requests.inbound =
                        Some(Box::new(Inbound::starting_at(self.requests.read_total)));
                    self.connection
                        .inner
                        .accepts_fds
                        .store(true, Ordering::Release);
                    debug!(conn = self.connection.id(), "descriptors accepted");
                }
                self.requests.reserve_write();
                encode_ack(&mut self.requests.wbuf, id);
                return Step::Next;
            }
            Item::Ping(id) => {
                self.requests.reserve_write();
                encode_ack(&mut self.requests.wbuf, id);
                return Step::Next;
            }
            Item::Shutdown(id) => {
                let uid = self.connection.peer().uid;
                if uid != self.core.daemon_uid {
                    let message =
                        format!("only uid {} may shut the daemon down", self.core.daemon_uid);
                    self.requests
                        .refuse(Some(id), TransportCode::NotPermitted, &message);
                    return Step::Next;
                }
                self.requests.reserve_write();
                encode_ack(&mut self.requests.wbuf, id);
                info!(
                    conn = self.connection.id(),
                    uid, "shutdown requested by a client"
                );
                self.core.begin_shutdown();
                return Step::Stop;
            }
            Item::Refused(refusal) => {
                let Refusal { id, code, message } = *refusal;
                self.requests.refuse(Some(id), code, &message);
                return Step::Next;
            }
            Item::Fatal(fatal) => {
                let FatalFrame { code, message, end } = *fatal;
                self.requests.refuse(None, code, &message);
                return Step::Close(end());
            }
        };
        // (Decoded with the item: always there for a call.)
        let Some(request) = self.requests.decoded.take() else {
            self.requests.refuse(
                Some(id),
                TransportCode::Internal,
                "the request was lost before it was handled",
            );
            return Step::Next;
        };
        // A request with descriptors goes to `call`, which can take them;
        // any other is offered to `call_batch` first.
        let call = if fds.is_empty() {
            self.offer_batch(id, request)
        } else {
            Some((id, request))
        };
        match call {
            Some((id, request)) => Step::Call(Box::pin(self.call(id, request, fds))),
            None => Step::Next,
        }
    }

    /// Offers the request (and what follows it) to `call_batch`; the
    /// request back if it took none (for `call`).
    fn offer_batch(&mut self, id: u64, request: RequestOf<S>) -> Option<(u64, RequestOf<S>)> {
        let state = self.state.as_mut()?;
        self.requests.stash = Some(Item::Call(id));
        self.requests.decoded = Some(request);
        self.requests.taken = 0;
        self.requests.stop_peeking = self.core.is_shutting_down();
        let mut batch = Batch {
            session: state,
            connection: &self.connection,
            server: &self.handle,
            wake: &mut self.wake,
            requests: &mut self.requests,
            _service: PhantomData,
        };
        // A panicking service fails the requests it took, not the connection.
        if std::panic::catch_unwind(AssertUnwindSafe(|| self.service.call_batch(&mut batch)))
            .is_err()
        {
            warn!(
                conn = self.connection.id(),
                "the service panicked in call_batch"
            );
        }
        while let Some(owed) = self.requests.owed.pop_front() {
            warn!(
                id = owed,
                "a service's call_batch took a request and did not answer it"
            );
            self.requests.refuse(
                Some(owed),
                TransportCode::Internal,
                "the service did not answer this request",
            );
        }
        if self.requests.taken > 0 {
            return None;
        }
        match self.requests.stash.take() {
            Some(Item::Call(id)) => self.requests.decoded.take().map(|request| (id, request)),
            _ => None,
        }
    }

    /// Hands one request to [`Service::call`] and answers it.
    async fn call(&mut self, id: u64, request: RequestOf<S>, fds: Vec<OwnedFd>) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        self.reply_fds = None;
        let call = self.service.call(
            Call {
                session: state,
                id,
                connection: &self.connection,
                server: &self.handle,
                wake: &mut self.wake,
                fds,
                reply_fds: &mut self.reply_fds,
            },
            request,
        );
        let result = drive(
            AssertUnwindSafe(call).catch_unwind(),
            self.stream,
            &self.connection.inner.outbox,
            &mut self.direct,
            &mut self.requests.wbuf,
            &mut self.requests.wfds,
        )
        .await;
        let reply_fds = self.reply_fds.take();
        match result {
            Ok(result) => self.requests.answer_with(id, result, reply_fds),
            Err(_) => {
                warn!(
                    conn = self.connection.id(),
                    id, "the service panicked handling a request"
                );
                self.requests.refuse(
                    Some(id),
                    TransportCode::Internal,
                    "the service failed while handling this request",
                );
            }
        }
    }

    /// Writes what is gathered (a final error, say) and closes.
    async fn close_after(&mut self, end: End) -> io::Result<End> {
        self.flush_bounded().await;
        Ok(end)
    }

    /// Sends `Closing{reason}` after what is already gathered, and closes.
    async fn close_with(&mut self, reason: CloseReason) -> io::Result<End> {
        self.outbox().close();
        self.requests.reserve_write();
        encode_closing(&mut self.requests.wbuf, reason);
        self.flush_bounded().await;
        Ok(End::Closing(reason))
    }

    /// Shutdown: deliver every event already queued, then `Closing{Shutdown}`.
    async fn close_for_shutdown(&mut self) -> io::Result<End> {
        self.outbox().close();
        loop {
            let taken = self.connection.inner.outbox.take(
                &mut self.requests.wbuf,
                usize::MAX,
                &mut self.direct,
                &mut self.requests.wfds,
            );
            if taken.overflowed {
                return self.close_with(CloseReason::SlowConsumer).await;
            }
            if taken.frames > 0 && self.direct.is_none() {
                continue;
            }
            if self.direct.is_none() && self.requests.wbuf.is_empty() {
                break;
            }
            // A shared event taken, or one waiting behind what is gathered:
            // write everything so far, then go on.
            let flush = flush_all(
                self.stream,
                &mut self.direct,
                &mut self.requests.wbuf,
                &mut self.requests.wfds,
            );
            if !matches!(
                crate::timer::timeout(CLOSE_FLUSH_TIMEOUT, flush).await,
                Ok(Ok(()))
            ) {
                return Ok(End::Closing(CloseReason::Shutdown));
            }
        }
        self.close_with(CloseReason::Shutdown).await
    }

    async fn flush_bounded(&mut self) {
        let flush = flush_all(
            self.stream,
            &mut self.direct,
            &mut self.requests.wbuf,
            &mut self.requests.wfds,
        );
        if let Ok(Err(err)) = crate::timer::timeout(CLOSE_FLUSH_TIMEOUT, flush).await {
            debug!(conn = self.connection.id(), error = %err, "final frames not delivered");
        }
    }
}

/// Writes everything gathered, waiting for room as needed.
async fn flush_all(
    stream: &mut Socket,
    direct: &mut Option<Box<EncodedEvent>>,
    wbuf: &mut BytesMut,
    wfds: &mut VecDeque<Attachment>,
) -> io::Result<()> {
    while direct.is_some() || !wbuf.is_empty() {
        if !write_gathered(stream, direct, wbuf, wfds)? {
            stream.writable().await?;
        }
    }
    Ok(())
}

/// One non-blocking write of `direct` (if any) then `wbuf`; `true` if
/// anything was written.
fn write_gathered(
    stream: &Socket,
    direct: &mut Option<Box<EncodedEvent>>,
    wbuf: &mut BytesMut,
    wfds: &mut VecDeque<Attachment>,
) -> io::Result<bool> {
    if !wfds.is_empty() {
        // Descriptors to send: each goes with its frame's first byte.
        let prefix: [&[u8]; 3] = match direct.as_ref() {
            Some(frame) => [&frame.head, &frame.shared, &frame.tail],
            None => [&[], &[], &[]],
        };
        let n = fds::write_attached(stream, prefix, wbuf, wfds)?;
        let mut from_frame = 0;
        if let Some(frame) = direct {
            from_frame = n.min(frame.len());
            frame.advance(from_frame);
            if frame.is_empty() {
                *direct = None;
            }
        }
        wbuf.advance(n - from_frame);
        return Ok(n > 0);
    }
    if let Some(frame) = direct {
        let parts = [
            IoSlice::new(&frame.head),
            IoSlice::new(&frame.shared),
            IoSlice::new(&frame.tail),
            IoSlice::new(wbuf),
        ];
        let sent = stream.try_write_io(|fd| send_parts(fd, &parts));
        return match sent {
            Ok(n) => {
                let from_frame = n.min(frame.len());
                frame.advance(from_frame);
                wbuf.advance(n - from_frame);
                if frame.is_empty() {
                    *direct = None;
                }
                Ok(n > 0)
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(err) => Err(err),
        };
    }
    if wbuf.is_empty() {
        return Ok(false);
    }
    match stream.try_write_io(|fd| Ok(rustix::net::send(fd, wbuf, SEND_FLAGS)?)) {
        Ok(n) => {
            wbuf.advance(n);
            Ok(n > 0)
        }
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(err) => Err(err),
    }
}

/// Runs a handler to completion. While it is pending, replies already
/// gathered and events queued for this connection are still written (a
/// write error is left for the session loop to meet again).
async fn drive<T>(
    handler: impl Future<Output = T>,
    stream: &mut Socket,
    outbox: &Outbox,
    direct: &mut Option<Box<EncodedEvent>>,
    wbuf: &mut BytesMut,
    wfds: &mut VecDeque<Attachment>,
) -> T {
    let mut handler = pin!(handler);
    if let Some(out) = (&mut handler).now_or_never() {
        return out;
    }
    let mut broken = false;
    loop {
        if !broken {
            if wbuf.len() < WRITE_BATCH_BYTES {
                outbox.take(wbuf, WRITE_BATCH_BYTES, direct, wfds);
            }
            broken = write_gathered(stream, direct, wbuf, wfds).is_err();
        }
        let want_write = !broken && (!wbuf.is_empty() || direct.is_some());
        tokio::select! {
            biased;
            out = &mut handler => return out,
            ready = stream.writable(), if want_write => broken |= ready.is_err(),
            _ = outbox.notified(), if !broken => {}
        }
    }
}
