//! File descriptors passed with frames (`SCM_RIGHTS`), after authentication
//! only (section 19 of proto-spec.md).
//!
//! A connection opts in with `AcceptFds`; until then it is read without an
//! ancillary buffer, so descriptors it sends are closed by the kernel unread
//! (as on the pre-auth path). After it, every read is a `recvmsg` with room
//! for [`MAX_FDS_PER_FRAME`] descriptors, received close-on-exec.
//!
//! Which frame descriptors belong to: the sender writes a frame that carries
//! descriptors with one `sendmsg` whose data starts at the frame's first
//! byte. A stream socket hands them to the `recvmsg` that reads that byte,
//! and never two senders' descriptors to one `recvmsg`, so descriptors that
//! arrive with the bytes `[from, to)` of the stream belong to the frame that
//! starts in that range and announces them ([`Inbound::claim`]). Any other
//! arrangement is an error, never a guess: descriptors no frame claims,
//! a frame whose descriptors are missing, more than a frame may carry, or
//! ancillary data truncated by the kernel (`MSG_CTRUNC`).

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::limits::{MAX_FDS_PER_FRAME, READ_CHUNK};

/// A socket's read half that takes ancillary data once switched on
/// (client side): until then a plain read (descriptors, which the daemon
/// never sends before `AcceptFds`, would be closed by the kernel).
pub(crate) struct FdReader {
    half: tokio::net::unix::OwnedReadHalf,
    enabled: Arc<std::sync::atomic::AtomicBool>,
    /// Where descriptors arrived, in the stream's bytes.
    pub(crate) inbound: Inbound,
    /// Where the next frame starts (kept by the frame reader).
    pub(crate) consumed: u64,
}

impl FdReader {
    pub(crate) fn new(
        half: tokio::net::unix::OwnedReadHalf,
        enabled: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Self {
            half,
            enabled,
            inbound: Inbound::new(),
            consumed: 0,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl tokio::io::AsyncRead for FdReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if !this.enabled() {
            let before = buf.filled().len();
            let polled = std::pin::Pin::new(&mut this.half).poll_read(cx, buf);
            if let Poll::Ready(Ok(())) = polled {
                let n = buf.filled().len() - before;
                this.inbound.arrived(n, Vec::new(), false);
            }
            return polled;
        }
        loop {
            let stream: &UnixStream = this.half.as_ref();
            match stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
            let unfilled = buf.initialize_unfilled();
            let mut fds = Vec::new();
            match stream.try_io(Interest::READABLE, || {
                recv_with_fds(stream, unfilled, &mut fds)
            }) {
                Ok((n, truncated)) => {
                    buf.advance(n);
                    this.inbound.arrived(n, fds, truncated);
                    return Poll::Ready(Ok(()));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

/// Descriptors that travel with one frame. Cheap to clone (shared): one
/// published memfd queued for many subscribers is one descriptor in the
/// daemon, whatever the number of queues it waits in.
#[derive(Clone)]
pub struct Descriptors(Arc<Vec<OwnedFd>>);

impl Descriptors {
    /// Wraps owned descriptors.
    pub fn new(fds: Vec<OwnedFd>) -> Self {
        Self(Arc::new(fds))
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The descriptors, borrowed.
    pub fn iter(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.0.iter().map(AsFd::as_fd)
    }

    /// The first descriptor, if any.
    pub fn first(&self) -> Option<BorrowedFd<'_>> {
        self.0.first().map(AsFd::as_fd)
    }
}

impl fmt::Debug for Descriptors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Descriptors({})", self.0.len())
    }
}

impl PartialEq for Descriptors {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Descriptors {}

/// Why descriptors that arrived cannot be handed to a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FdError {
    /// Descriptors arrived with bytes in which no frame announcing them starts.
    #[error(
        "{count} file descriptors arrived with bytes {from}..{to} of the stream, where no frame announcing descriptors starts"
    )]
    Unannounced {
        /// How many.
        count: usize,
        /// The first byte of the read they came with.
        from: u64,
        /// One past its last byte.
        to: u64,
    },
    /// A frame announced descriptors that did not arrive with it.
    #[error(
        "the frame at byte {at} announces {announced} file descriptors, {received} arrived with it"
    )]
    Missing {
        /// The frame's first byte in the stream.
        at: u64,
        /// Its count.
        announced: usize,
        /// What came with it.
        received: usize,
    },
    /// More than [`MAX_FDS_PER_FRAME`], or the kernel cut the ancillary data.
    #[error(
        "more file descriptors than the {MAX_FDS_PER_FRAME} a frame may carry (ancillary data truncated)"
    )]
    Truncated,
}

/// Descriptors received with one read.
#[derive(Debug)]
struct Arrival {
    from: u64,
    to: u64,
    fds: Vec<OwnedFd>,
    /// More than a frame may carry came (and were closed), or the kernel
    /// cut them (`MSG_CTRUNC`): whichever frame they are for is refused.
    truncated: bool,
}

impl Arrival {
    /// The error for these descriptors when no frame may have them.
    fn stray(&self) -> FdError {
        if self.truncated {
            return FdError::Truncated;
        }
        FdError::Unannounced {
            count: self.fds.len(),
            from: self.from,
            to: self.to,
        }
    }
}

/// The reading side of a connection that accepts descriptors: where in the
/// stream descriptors arrived, and a buffer to read into.
#[derive(Debug, Default)]
pub struct Inbound {
    /// Bytes read from the stream so far.
    read: u64,
    arrivals: VecDeque<Arrival>,
    /// Initialized bytes to `recvmsg` into (the call takes initialized
    /// memory), copied into the caller's buffer after.
    scratch: Vec<u8>,
    /// Descriptors claimed by the frame last decoded, until it is handled.
    claimed: Vec<OwnedFd>,
}

impl Inbound {
    /// A reader with nothing read yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the descriptors of the frame just decoded until it is handled
    /// (any still held are closed).
    pub fn hold_claimed(&mut self, fds: Vec<OwnedFd>) {
        self.claimed = fds;
    }

    /// The descriptors of the frame at hand.
    pub fn take_claimed(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.claimed)
    }

    /// A reader of a stream of which `read` bytes were read already
    /// (without ancillary data).
    pub fn starting_at(read: u64) -> Self {
        Self {
            read,
            ..Self::default()
        }
    }

    /// Bytes of memory it holds (its read buffer).
    pub fn footprint(&self) -> usize {
        self.scratch.capacity()
    }

    /// One non-blocking `recvmsg` of at most `max` bytes: the bytes are
    /// appended to `dst`, the descriptors kept for the frame they belong
    /// to. `WouldBlock` when nothing is there; `Ok(0)` at end of stream.
    pub fn read(
        &mut self,
        socket: BorrowedFd<'_>,
        dst: &mut bytes::BytesMut,
        max: usize,
    ) -> io::Result<usize> {
        if self.scratch.len() < READ_CHUNK {
            self.scratch.resize(READ_CHUNK, 0);
        }
        let mut fds = Vec::new();
        let limit = max.clamp(1, READ_CHUNK);
        let scratch = &mut self.scratch[..limit];
        let (n, truncated) = recv_with_fds(socket, scratch, &mut fds)?;
        dst.extend_from_slice(&self.scratch[..n]);
        self.arrived(n, fds, truncated);
        Ok(n)
    }

    /// Notes a read of `n` bytes that brought `fds` (and whether its
    /// ancillary data was truncated). A truncated read is placed in the
    /// stream like any other arrival: the frames before it are not its
    /// concern, and the frame that would have claimed its descriptors, or
    /// the check that no frame can, refuses it (`TooManyDescriptors`).
    pub fn arrived(&mut self, n: usize, fds: Vec<OwnedFd>, truncated: bool) {
        let from = self.read;
        self.read += n as u64;
        if !fds.is_empty() || truncated {
            self.arrivals.push_back(Arrival {
                from,
                to: self.read,
                fds,
                truncated,
            });
        }
    }

    /// Checks the stream up to a frame starting at byte `at`: descriptors
    /// that arrived wholly before it were announced by no frame.
    pub fn check_before(&mut self, at: u64) -> Result<(), FdError> {
        match self.arrivals.front() {
            Some(first) if first.to <= at => Err(first.stray()),
            _ => Ok(()),
        }
    }

    /// Checks what is held when every whole frame read so far has been
    /// handled and the next frame starts at byte `at` (it has not arrived
    /// whole, or not at all): the one arrival a frame can still claim is
    /// the one that came with that frame's first byte. Any other arrived
    /// before it, or after it inside the partial frame, where no frame
    /// starts: announced by no frame. Checked as soon as that is known, not
    /// when a later frame completes, so that a peer cannot make the daemon
    /// hold descriptors by never completing a frame (one `sendmsg` a byte,
    /// each with descriptors), nor keep stray ones unanswered by sending
    /// them with its last frame and waiting.
    pub fn check_pending(&mut self, at: u64) -> Result<(), FdError> {
        self.check_before(at)?;
        match self.arrivals.iter().find(|a| a.from > at) {
            Some(stray) => Err(stray.stray()),
            None => Ok(()),
        }
    }

    /// The `announced` descriptors of the frame starting at byte `at`.
    pub fn claim(&mut self, at: u64, announced: usize) -> Result<Vec<OwnedFd>, FdError> {
        self.check_before(at)?;
        let missing = |received| FdError::Missing {
            at,
            announced,
            received,
        };
        match self.arrivals.front() {
            Some(first) if first.from <= at && at < first.to => {
                if first.truncated {
                    return Err(FdError::Truncated);
                }
                if first.fds.len() != announced {
                    return Err(missing(first.fds.len()));
                }
                Ok(self.arrivals.pop_front().map(|a| a.fds).unwrap_or_default())
            }
            _ => Err(missing(0)),
        }
    }
}

/// Room for one frame's descriptors and one more, so that a sender of too
/// many is seen (`MSG_CTRUNC`) rather than cut silently.
const CONTROL_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS_PER_FRAME + 1));

/// One `recvmsg` into `buf`: bytes read, and whether the ancillary data
/// was truncated (more descriptors than fit, which the kernel then closed).
/// Received descriptors are close-on-exec and appended to `fds`; more than
/// [`MAX_FDS_PER_FRAME`] counts as truncated (and they are closed).
pub fn recv_with_fds(
    socket: impl AsFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    let mut space = [MaybeUninit::<u8>::uninit(); CONTROL_SPACE];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = rustix::net::recvmsg(
        socket,
        &mut iov,
        &mut control,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    )?;
    let mut truncated = msg.flags.contains(ReturnFlags::CTRUNC);
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if fds.len() > MAX_FDS_PER_FRAME {
        fds.clear();
        truncated = true;
    }
    Ok((msg.bytes, truncated))
}

/// One `sendmsg` of `bufs` carrying `fds` with their first byte. Returns
/// the bytes sent; once it is above 0, the descriptors have gone.
pub fn send_with_fds(
    socket: impl AsFd,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let mut space = [MaybeUninit::<u8>::uninit(); CONTROL_SPACE];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} file descriptors are more than the {MAX_FDS_PER_FRAME} a frame may carry",
                fds.len()
            ),
        ));
    }
    Ok(rustix::net::sendmsg(
        socket,
        bufs,
        &mut control,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?)
}

/// A frame with descriptors waiting in a write buffer: they go with the
/// byte at `at` (an offset into the buffer).
#[derive(Debug)]
pub struct Attachment {
    /// Offset of the frame's first byte in the write buffer.
    pub at: usize,
    /// What goes with it.
    pub fds: Descriptors,
}

/// Writes `prefix` (a frame being written, in its parts; empty slices when
/// none) then `buf` without waiting, sending each attachment's descriptors
/// with its first byte; `Ok(0)` when the socket is not ready. Attachments
/// written are removed and the others' offsets moved by what was written.
pub(crate) fn write_attached(
    stream: &crate::server::socket::Socket,
    prefix: [&[u8]; 3],
    buf: &[u8],
    attachments: &mut VecDeque<Attachment>,
) -> io::Result<usize> {
    let prefix_len: usize = prefix.iter().map(|p| p.len()).sum();
    // Up to the next attachment that is not at the start.
    let (end, fds) = match attachments.front() {
        Some(first) if first.at == 0 && prefix_len == 0 => {
            let end = attachments.get(1).map_or(buf.len(), |next| next.at);
            (end, Some(&first.fds))
        }
        Some(first) => (first.at, None),
        None => (buf.len(), None),
    };
    let parts = [
        IoSlice::new(prefix[0]),
        IoSlice::new(prefix[1]),
        IoSlice::new(prefix[2]),
        IoSlice::new(&buf[..end]),
    ];
    let result = stream.try_write_io(|socket| match fds {
        Some(fds) => {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().collect();
            send_with_fds(socket, &parts, &borrowed)
        }
        None => crate::server::socket::send_parts(socket, &parts),
    });
    let n = match result {
        Ok(n) => n,
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(0),
        Err(err) => return Err(err),
    };
    let from_buf = n.saturating_sub(prefix_len);
    if fds.is_some() && n > 0 {
        attachments.pop_front();
    }
    for attachment in attachments.iter_mut() {
        attachment.at -= from_buf.min(attachment.at);
    }
    Ok(n)
}
