//! The daemon's end of a connection, and its listener: sockets registered
//! with tokio's event loop for input only.
//!
//! tokio's `UnixStream` registers every socket for input and output, edge
//! triggered. A Unix stream socket reports an output edge each time its
//! peer takes bytes off it, so every reply a client reads wakes a parked
//! worker that has nothing to do with it. Redis registers a connection for
//! input only and writes straight to it, asking for output readiness only
//! while a write is short. [`Socket`] does the same: writes go straight to
//! the socket; the first one that does not fit registers a duplicate of the
//! descriptor for output ([`Socket::watch_writable`]), dropped again once
//! everything is written ([`Socket::unwatch_writable`]).
//!
//! (Registration goes through `AsyncFd::with_interest`, which tokio
//! deprecates as unsound for a type whose descriptor can change under it
//! (tokio-rs/tokio#8587). Its replacement differs only in being `unsafe`,
//! with the requirement that the descriptor stays open and the same while
//! registered: an `OwnedFd`'s does, and the crate forbids `unsafe`.)

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::task::{Context, Poll};

use nix::sys::socket::MsgFlags;
use rustix::net::{SendAncillaryBuffer, SendFlags, SocketFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::server::Peer;

/// Reads into a `BytesMut` go through a buffer of this size, initialized
/// once per worker thread (the crate reads into initialized memory only).
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static READ_SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// Runs `f` on this worker thread's scratch buffer, of at most `max`
/// bytes: somewhere to read into before it is known how much will come.
/// (Not reentrant: `f` must not call it again.)
pub(crate) fn with_scratch<R>(max: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    READ_SCRATCH.with_borrow_mut(|scratch| f(&mut scratch[..max.min(SCRATCH)]))
}

/// Writes never wait and never raise `SIGPIPE` (a closed peer is an error).
pub(crate) const SEND_FLAGS: SendFlags = SendFlags::DONTWAIT.union(SendFlags::NOSIGNAL);

/// One `sendmsg` of `parts`, without ancillary data (for
/// [`Socket::try_write_io`]).
pub(crate) fn send_parts(fd: BorrowedFd<'_>, parts: &[IoSlice<'_>]) -> io::Result<usize> {
    let mut none = SendAncillaryBuffer::default();
    Ok(rustix::net::sendmsg(fd, parts, &mut none, SEND_FLAGS)?)
}

/// One non-blocking `recvmsg` into `iov` that asks for no address and
/// offers no room for ancillary data: the bytes read, and whether
/// ancillary data was cut (`MSG_CTRUNC`: descriptors came with the bytes,
/// which the kernel has closed; a stream read stops after them).
///
/// (nix's, with `()` for the address, not rustix's `recvmsg`, which always
/// passes a 128-byte address buffer and converts what comes back: 48
/// instructions a strict request, callgrind ping 2584 -> 2536. The kernel
/// still copies the peer's address on every `recvmsg` of a Unix stream
/// socket, `unix_copy_addr`, into a buffer of its own: only `recv` skips
/// that, and `recv` does not report `MSG_CTRUNC`.)
pub(crate) fn recv_data(
    fd: BorrowedFd<'_>,
    iov: &mut [IoSliceMut<'_>],
) -> io::Result<(usize, bool)> {
    let msg = nix::sys::socket::recvmsg::<()>(fd.as_raw_fd(), iov, None, MsgFlags::MSG_DONTWAIT)?;
    Ok((msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC)))
}

/// Registers `fd` with the current runtime's event loop for `interest`.
#[allow(
    deprecated,
    reason = "sound for an OwnedFd (see the module doc); the replacement is unsafe"
)]
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::with_interest(fd, interest)
}

/// An accepted, non-blocking connection socket.
pub(crate) struct Socket {
    read: AsyncFd<OwnedFd>,
    /// A duplicate of the descriptor registered for output, while a write
    /// waits for room.
    write: Option<AsyncFd<OwnedFd>>,
}

impl Socket {
    /// Registers an accepted socket (already non-blocking) for input.
    /// Must be called within a tokio runtime.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self {
            read: register(fd, Interest::READABLE)?,
            write: None,
        })
    }

    /// The peer's credentials from the kernel (`SO_PEERCRED`). The pid is 0
    /// when the peer is in a pid namespace this process cannot see into.
    pub(crate) fn peer(&self) -> io::Result<Peer> {
        peer_of(self.read.get_ref())
    }

    /// Runs `op` (one non-blocking input system call) if the socket is
    /// known to be readable; `WouldBlock` from it clears that readiness.
    /// `WouldBlock` without a call while the readiness is not known.
    pub(crate) fn try_read_io<R>(
        &self,
        op: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>,
    ) -> io::Result<R> {
        self.read.try_io(Interest::READABLE, |fd| op(fd.as_fd()))
    }

    /// Ready when input (or the end of the stream) is there, as far as the
    /// event loop has reported.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.read.poll_read_ready(cx).map_ok(|_guard| ())
    }

    /// Runs `op` (one non-blocking output system call): straight on the
    /// socket unless a write is waiting for room, then once the event loop
    /// reports room. `WouldBlock` means: [`Self::watch_writable`] and wait
    /// for [`Self::poll_write_ready`].
    pub(crate) fn try_write_io<R>(
        &self,
        op: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>,
    ) -> io::Result<R> {
        match &self.write {
            Some(write) => write.try_io(Interest::WRITABLE, |fd| op(fd.as_fd())),
            None => op(self.read.get_ref().as_fd()),
        }
    }

    /// Registers for output readiness, if not yet (after a write that did
    /// not fit).
    pub(crate) fn watch_writable(&mut self) -> io::Result<()> {
        if self.write.is_none() {
            let dup = rustix::io::fcntl_dupfd_cloexec(self.read.get_ref(), 0)?;
            self.write = Some(register(dup, Interest::WRITABLE)?);
        }
        Ok(())
    }

    /// Stops watching for output readiness (nothing waits to be written).
    pub(crate) fn unwatch_writable(&mut self) {
        self.write = None;
    }

    /// Ready when the socket has room, as reported since
    /// [`Self::watch_writable`]; always ready when not watching (the next
    /// write goes straight to the socket).
    pub(crate) fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.write {
            Some(write) => write.poll_write_ready(cx).map_ok(|_guard| ()),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Waits for room to write.
    pub(crate) async fn writable(&mut self) -> io::Result<()> {
        self.watch_writable()?;
        std::future::poll_fn(|cx| self.poll_write_ready(cx)).await
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.get_ref().as_fd()
    }
}

/// The credentials of the process at the other end of `fd`.
pub(crate) fn peer_of(fd: &impl AsFd) -> io::Result<Peer> {
    // (nix's `UnixCredentials` holds the pid as a plain integer: it is 0
    // for a peer in another pid namespace.)
    let cred = nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?;
    Ok(Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

/// A listening socket registered for input.
pub(crate) struct Listener {
    fd: AsyncFd<OwnedFd>,
}

impl Listener {
    /// Takes over a tokio listener (moving its registration to this one).
    pub(crate) fn new(listener: tokio::net::UnixListener) -> io::Result<Self> {
        let std = listener.into_std()?;
        std.set_nonblocking(true)?;
        Ok(Self {
            fd: register(OwnedFd::from(std), Interest::READABLE)?,
        })
    }

    /// The next connection (non-blocking, close-on-exec), or `Pending`
    /// until the event loop reports one.
    pub(crate) fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<OwnedFd>> {
        loop {
            let mut ready = match self.fd.poll_read_ready(cx) {
                Poll::Ready(Ok(ready)) => ready,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            };
            if let Ok(accepted) = ready.try_io(|fd| accept_now(fd.get_ref())) {
                return Poll::Ready(accepted);
            }
        }
    }

    /// A connection already waiting, without waiting for one.
    pub(crate) fn accept_now(&self) -> io::Result<OwnedFd> {
        accept_now(&self.fd)
    }
}

fn accept_now(fd: &impl AsFd) -> io::Result<OwnedFd> {
    Ok(rustix::net::accept_with(
        fd,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
    )?)
}
