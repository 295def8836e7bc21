//! Everything an unauthenticated peer's bytes reach, in one file: the
//! daemon's side of sections 4 and 8 of proto-spec.md.
//!
//! 1. [`admit`]: before any byte is read, the peer's uid must be allowed
//!    (the connection cap was checked at accept); then the connection waits
//!    for a pending slot, unread, as `super::admission` decides.
//! 2. The handshake is read into [`HandshakeParser`], a sans-IO state
//!    machine (bytes in, verdict out; no socket, no clock), straight into
//!    its 44-byte buffer; a wrong length prefix is rejected as soon as its
//!    4 bytes are in, none of the bytes after it looked at. The first read,
//!    made without waiting (a client sends its handshake as soon as it
//!    connects, so it is usually there), is [`pump_first`]: one `readv`
//!    into the parser's buffer and on into [`READ_AHEAD`] bytes, so that
//!    requests written with the handshake come in the same read. Those
//!    bytes are not looked at here: they go to the session once the
//!    handshake is accepted, and are dropped unread otherwise. If the first
//!    read leaves the handshake incomplete, [`pump`] reads the rest on
//!    readiness, until the deadline, never more than the parser wants.
//! 3. [`HandshakeParser::verify`] checks magic, then version, then the token
//!    in constant time (always, whatever failed before), and zeroizes the
//!    buffer whatever the outcome.
//! 4. Any failure: one `Error` frame without an id ([`refuse`]), then close.
//!    Nothing else is ever written to a pending connection.

use std::future::{Future, poll_fn};
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use bytes::BytesMut;
use rustix::net::RecvFlags;
use zeroize::Zeroize;

use super::Core;
use super::admission::Standing;
use super::connection::Peer;
use super::session::read_draining;
use super::socket::Socket;
use crate::handshake::{MAGIC, MAGIC_AT, SUPPORTED_VERSIONS, TOKEN_AT, VERSION_AT};
use crate::limits::{
    HANDSHAKE_FRAME_LEN, HANDSHAKE_PAYLOAD_LEN, LENGTH_PREFIX_LEN, READ_CHUNK, TOKEN_LEN,
};
use crate::token::SessionToken;
use crate::transport::{TransportCode, encode_error};

/// Why a handshake was refused. Carries no peer bytes beyond fixed-size
/// numbers, so it is safe to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The first frame's length prefix is not the handshake's.
    #[error("the first frame must be the {expected}-byte handshake; its length prefix says {got}")]
    WrongLength {
        /// The length the peer announced.
        got: u32,
        /// [`HANDSHAKE_PAYLOAD_LEN`].
        expected: u32,
    },
    /// The payload does not start with [`MAGIC`].
    #[error("handshake magic is not KYHL")]
    BadMagic,
    /// The protocol version is not one this build speaks.
    #[error("protocol version {got} is not supported; this daemon speaks {supported:?}")]
    UnsupportedVersion {
        /// The version the peer sent.
        got: u32,
        /// [`SUPPORTED_VERSIONS`].
        supported: &'static [u32],
    },
    /// The token is not the session token.
    #[error("the token does not match this daemon's session token")]
    BadToken,
}

impl Rejection {
    /// The error code sent to the peer.
    pub fn code(self) -> TransportCode {
        match self {
            Rejection::WrongLength { .. } => TransportCode::HandshakeExpected,
            Rejection::BadMagic => TransportCode::BadMagic,
            Rejection::UnsupportedVersion { .. } => TransportCode::UnsupportedVersion,
            Rejection::BadToken => TransportCode::BadToken,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reading,
    Complete,
    Done,
}

/// The sans-IO handshake parser. Holds at most one handshake frame and
/// zeroizes it after a verdict and on drop.
pub struct HandshakeParser {
    buf: [u8; HANDSHAKE_FRAME_LEN],
    filled: usize,
    state: State,
}

/// What the parser made of the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed.
    NeedMore,
    /// The whole frame is buffered: call [`HandshakeParser::verify`].
    Complete,
}

impl Default for HandshakeParser {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for HandshakeParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeParser")
            .field("filled", &self.filled)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl HandshakeParser {
    /// A parser waiting for the first byte.
    pub fn new() -> Self {
        Self {
            buf: [0; HANDSHAKE_FRAME_LEN],
            filled: 0,
            state: State::Reading,
        }
    }

    /// Where the next bytes go: the rest of the handshake frame (empty once
    /// the frame is complete or a verdict was given). Read at most this much.
    pub fn spare(&mut self) -> &mut [u8] {
        match self.state {
            State::Reading => &mut self.buf[self.filled..],
            State::Complete | State::Done => &mut [],
        }
    }

    /// Bytes buffered (never more than [`HANDSHAKE_FRAME_LEN`]).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn buffered_len(&self) -> usize {
        self.filled
    }

    /// Takes note of `n` bytes written into [`Self::spare`]. The length
    /// prefix is checked as soon as its 4 bytes are in; bytes after a wrong
    /// prefix are zeroized unread.
    pub fn filled(&mut self, n: usize) -> Result<Progress, Rejection> {
        if self.state != State::Reading {
            return Ok(Progress::NeedMore);
        }
        let before = self.filled;
        self.filled = (self.filled + n).min(HANDSHAKE_FRAME_LEN);
        if before < LENGTH_PREFIX_LEN && self.filled >= LENGTH_PREFIX_LEN {
            let got = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            if got as usize != HANDSHAKE_PAYLOAD_LEN {
                self.filled = LENGTH_PREFIX_LEN;
                self.finish();
                return Err(Rejection::WrongLength {
                    got,
                    expected: HANDSHAKE_PAYLOAD_LEN as u32,
                });
            }
        }
        if self.filled == HANDSHAKE_FRAME_LEN {
            self.state = State::Complete;
            return Ok(Progress::Complete);
        }
        Ok(Progress::NeedMore)
    }

    /// Copies what it wants of `input` in (tests and fuzzers); returns the
    /// bytes taken and the progress.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn feed(&mut self, input: &[u8]) -> (usize, Result<Progress, Rejection>) {
        let spare = self.spare();
        let n = spare.len().min(input.len());
        spare[..n].copy_from_slice(&input[..n]);
        let before = self.filled;
        let progress = self.filled(n);
        let taken = if progress.is_err() {
            LENGTH_PREFIX_LEN.saturating_sub(before)
        } else {
            n
        };
        (taken, progress)
    }

    /// Checks magic, version and token (constant time), then zeroizes the
    /// buffer, whatever the outcome. Only a complete handshake can pass;
    /// calling it before is a `WrongLength` with what arrived.
    pub fn verify(&mut self, token: &SessionToken) -> Result<(), Rejection> {
        let verdict = if self.state != State::Complete {
            Err(Rejection::WrongLength {
                got: self.filled.saturating_sub(LENGTH_PREFIX_LEN) as u32,
                expected: HANDSHAKE_PAYLOAD_LEN as u32,
            })
        } else {
            let mut version = [0u8; 4];
            version.copy_from_slice(&self.buf[VERSION_AT..VERSION_AT + 4]);
            let version = u32::from_le_bytes(version);
            // Compared in every case, so timing says nothing about the token.
            let token_ok = token.matches(&self.buf[TOKEN_AT..TOKEN_AT + TOKEN_LEN]);
            if self.buf[MAGIC_AT..MAGIC_AT + 4] != MAGIC {
                Err(Rejection::BadMagic)
            } else if !SUPPORTED_VERSIONS.contains(&version) {
                Err(Rejection::UnsupportedVersion {
                    got: version,
                    supported: SUPPORTED_VERSIONS,
                })
            } else if !token_ok {
                Err(Rejection::BadToken)
            } else {
                Ok(())
            }
        };
        self.finish();
        verdict
    }

    /// Whether a verdict was given (no byte is taken after it).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The buffer, for the tests and fuzzers that check it is zeroed.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn buffer(&self) -> &[u8; HANDSHAKE_FRAME_LEN] {
        &self.buf
    }

    fn finish(&mut self) {
        self.buf.zeroize();
        self.state = State::Done;
    }
}

impl Drop for HandshakeParser {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

/// The outcome of a handshake. Whatever it is, the parser's buffer is all
/// zeros once it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The token matched.
    Authenticated,
    /// Refused.
    Rejected(Rejection),
    /// The peer closed (or the socket failed) before a complete handshake.
    Ended,
}

/// Bytes the first read of a connection takes past the handshake, at most:
/// room for the requests a client writes in its handshake's write.
pub const READ_AHEAD: usize = 1024;

/// The first read of a connection, one call of `read` (a `readv`): the
/// handshake into the parser's buffer, and what follows it on into
/// `ahead`, which nothing here looks at. Returns the verdict, if this read
/// gave one, and how many bytes of `ahead` hold what came after the
/// handshake: `0` unless the verdict is [`Verdict::Authenticated`] (after
/// any other outcome those bytes are the caller's to drop unread). `None`:
/// the handshake is not complete yet (or nothing came); go on with
/// [`pump`], which takes nothing past the frame.
pub fn pump_first(
    parser: &mut HandshakeParser,
    token: &SessionToken,
    ahead: &mut [u8],
    read: impl FnOnce(&mut [io::IoSliceMut<'_>]) -> io::Result<usize>,
) -> (Option<Verdict>, usize) {
    let spare = parser.spare();
    let wanted = spare.len();
    let n = match read(&mut [io::IoSliceMut::new(spare), io::IoSliceMut::new(ahead)]) {
        Ok(0) => {
            parser.finish();
            return (Some(Verdict::Ended), 0);
        }
        Ok(n) => n,
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            return (None, 0);
        }
        Err(_) => {
            parser.finish();
            return (Some(Verdict::Ended), 0);
        }
    };
    match parser.filled(n.min(wanted)) {
        Ok(Progress::NeedMore) => (None, 0),
        Ok(Progress::Complete) => match parser.verify(token) {
            Ok(()) => (Some(Verdict::Authenticated), n - wanted),
            Err(rejection) => (Some(Verdict::Rejected(rejection)), 0),
        },
        Err(rejection) => (Some(Verdict::Rejected(rejection)), 0),
    }
}

/// The driver of the parser after the first read: reads with `read`
/// straight into the parser's buffer, never more than it wants, until a
/// verdict (`Some`) or until `read` would block (`None`; what was read
/// stays in the parser).
/// `read` returns the bytes read, `Ok(0)` at the end of the stream.
pub fn pump(
    parser: &mut HandshakeParser,
    token: &SessionToken,
    mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
) -> Option<Verdict> {
    loop {
        let spare = parser.spare();
        if spare.is_empty() {
            // A verdict was given already: nothing more is read.
            return Some(Verdict::Ended);
        }
        match read(spare) {
            Ok(0) => {
                parser.finish();
                return Some(Verdict::Ended);
            }
            Ok(n) => match parser.filled(n) {
                Ok(Progress::NeedMore) => {}
                Ok(Progress::Complete) => {
                    return Some(match parser.verify(token) {
                        Ok(()) => Verdict::Authenticated,
                        Err(rejection) => Verdict::Rejected(rejection),
                    });
                }
                Err(rejection) => return Some(Verdict::Rejected(rejection)),
            },
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return None,
            Err(_) => {
                parser.finish();
                return Some(Verdict::Ended);
            }
        }
    }
}

/// Why a connection was not authenticated: the code and text of the one
/// `Error` frame it is sent.
pub(crate) struct Refused {
    pub(crate) code: TransportCode,
    pub(crate) message: String,
}

impl Refused {
    fn new(code: TransportCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What the handshake's first read took past the handshake, for the
/// session: requests written with the handshake (often none).
pub(crate) struct Ahead {
    pub(crate) bytes: BytesMut,
    /// The read that completed the handshake was this first read and came
    /// back short: the socket held nothing more, and the session's first
    /// read can wait for the next readiness.
    pub(crate) drained: bool,
}

/// Runs steps 1 to 3 of the module doc for one accepted connection (which
/// already counts against the connection cap). Authenticated: what the
/// first read took past the handshake.
///
/// (A function returning an `async move` block: an `async fn` keeps each
/// argument twice in its state, which is part of every pending
/// connection's task.)
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
pub(crate) fn admit<'a>(
    core: &'a Arc<Core>,
    stream: &'a Socket,
    peer: Peer,
    conn_id: u64,
) -> impl Future<Output = Result<Ahead, Refused>> + Send + 'a {
    async move {
        if !core.uid_allowed(peer.uid) {
            return Err(Refused::new(
                TransportCode::PeerNotAllowed,
                format!("uid {} may not use this daemon", peer.uid),
            ));
        }
        let ticket = core.admission.arrive(conn_id, peer.pid);
        // Waiting for a slot: the socket is not read meanwhile, but a peer that
        // hangs up is noticed (its place and its share of the connection cap
        // are given back at once). Once input is there (the handshake, read
        // when the slot comes), readiness is not watched any more.
        let mut standing = ticket.standing();
        let mut watch_hangup = true;
        while standing == Standing::Waiting {
            // (Shutdown comes as a standing too: `Admission::shut_down`.)
            tokio::select! {
                biased;
                now = ticket.changed(Standing::Waiting) => standing = now,
                ready = poll_fn(|cx| stream.poll_read_ready(cx)), if watch_hangup => {
                    if ready.is_err() {
                        return Err(ended());
                    }
                    // Readiness may be stale (a new socket starts as ready):
                    // look without taking. End of stream: the peer has gone;
                    // nothing yet: wait for readiness again; input: stop
                    // watching.
                    let mut byte = [0u8; 1];
                    match stream.try_read_io(|fd| {
                        rustix::net::recv(fd, &mut byte[..], RecvFlags::PEEK | RecvFlags::DONTWAIT)
                            .map(|(n, _)| n)
                            .map_err(io::Error::from)
                    }) {
                        Ok(0) => return Err(ended()),
                        Ok(_) => watch_hangup = false,
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Err(ended()),
                    }
                }
            }
        }
        if let Some(refused) = refused_for(core, standing) {
            return Err(refused);
        }
        if core.is_shutting_down() {
            return Err(shutting_down());
        }
        let mut parser = HandshakeParser::new();
        let token = &*core.token;
        // Usually there already: read it without waiting for readiness (a
        // wake-up across threads).
        let (first, ahead) = read_first(&mut parser, token, stream);
        let verdict = match first {
            Some(verdict) => verdict,
            None => {
                let read = async {
                    loop {
                        if poll_fn(|cx| stream.poll_read_ready(cx)).await.is_err() {
                            return Verdict::Ended;
                        }
                        if let Some(verdict) = pump(&mut parser, token, |buf| {
                            stream.try_read_io(|fd| {
                                rustix::io::read(fd, &mut *buf).map_err(io::Error::from)
                            })
                        }) {
                            return verdict;
                        }
                    }
                };
                tokio::select! {
                    biased;
                    now = ticket.changed(Standing::Active) => {
                        return Err(refused_for(core, now).unwrap_or_else(evicted));
                    }
                    verdict = read => verdict,
                }
            }
        };
        match verdict {
            Verdict::Authenticated => Ok(ahead),
            Verdict::Rejected(rejection) => {
                Err(Refused::new(rejection.code(), rejection.to_string()))
            }
            Verdict::Ended => Err(ended()),
        }
    }
}

fn ended() -> Refused {
    Refused::new(
        TransportCode::HandshakeExpected,
        "connection ended before a complete handshake",
    )
}

/// The refusal for a standing other than `Active`.
fn refused_for(core: &Core, standing: Standing) -> Option<Refused> {
    match standing {
        Standing::Active | Standing::Waiting => None,
        Standing::Evicted => Some(evicted()),
        Standing::ShuttingDown => Some(shutting_down()),
        Standing::TimedOut => {
            let timeout = core.config.auth_timeout;
            Some(Refused::new(
                TransportCode::AuthTimeout,
                format!(
                    "no complete handshake within {:.1} s",
                    timeout.as_secs_f64()
                ),
            ))
        }
    }
}

fn shutting_down() -> Refused {
    Refused::new(TransportCode::ShuttingDown, "the daemon is shutting down")
}

fn evicted() -> Refused {
    Refused::new(
        TransportCode::TooManyUnauthenticated,
        "too many unauthenticated connections; this one held a pending slot past its grace while others waited",
    )
}

/// [`pump_first`] on the socket. The bytes past an accepted handshake come
/// back in a buffer of their own, sized as the session's first read would
/// size it; none otherwise. (Not in `admit`'s async block: the read-ahead
/// buffer is on this function's stack, not in every pending connection's
/// state.)
fn read_first(
    parser: &mut HandshakeParser,
    token: &SessionToken,
    stream: &Socket,
) -> (Option<Verdict>, Ahead) {
    let mut ahead = [0u8; READ_AHEAD];
    let mut room = 0;
    let mut got = 0;
    let (verdict, n) = pump_first(parser, token, &mut ahead, |iov| {
        room = iov.iter().map(|buf| buf.len()).sum();
        // A short read marks the socket drained (the session's next read
        // then waits for new input instead of finding nothing); with the
        // readiness not known yet, the read goes straight to the socket.
        let mut ready = false;
        match read_draining(stream, iov, &mut ready) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock && !ready => {
                rustix::io::readv(stream, iov).map_err(io::Error::from)
            }
            read => read,
        }
        .inspect(|&n| got = n)
    });
    let mut bytes = BytesMut::new();
    if n > 0 {
        bytes.reserve(if n == READ_AHEAD { READ_CHUNK } else { n });
        bytes.extend_from_slice(&ahead[..n]);
    }
    // (Only a verdict from this read tells the session anything: after a
    // handshake in pieces, later reads went through the readiness.)
    let drained = verdict.is_some() && got < room;
    (verdict, Ahead { bytes, drained })
}

/// Sends the one `Error` frame without waiting (the socket buffer of a peer
/// that was sent nothing else always has room for it); the caller closes.
pub(crate) fn refuse(socket: &impl AsFd, refused: &Refused) {
    let mut frame = bytes::BytesMut::new();
    encode_error(&mut frame, None, refused.code.into(), &refused.message);
    let _ = rustix::net::send(socket, &frame, super::socket::SEND_FLAGS);
    frame.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::HandshakeFrame;

    fn token() -> SessionToken {
        SessionToken::from_bytes(std::array::from_fn(|i| i as u8 * 7 + 1))
    }

    /// Drives `input` through [`pump`] in reads of `chunk` bytes.
    fn run(input: &[u8], chunk: usize) -> (Option<Verdict>, usize, HandshakeParser) {
        let mut parser = HandshakeParser::new();
        let mut at = 0;
        let verdict = pump(&mut parser, &token(), |buf| {
            if at == input.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(chunk).min(input.len() - at);
            buf[..n].copy_from_slice(&input[at..at + n]);
            at += n;
            Ok(n)
        });
        (verdict, at, parser)
    }

    #[test]
    fn the_exact_handshake_authenticates_in_any_split() {
        let frame = HandshakeFrame::new(&token());
        for chunk in [1, 3, 4, 5, 43, 44, 1000] {
            let (verdict, read, parser) = run(&frame, chunk);
            assert_eq!(verdict, Some(Verdict::Authenticated), "chunk {chunk}");
            assert_eq!(read, HANDSHAKE_FRAME_LEN);
            assert_eq!(parser.buffer(), &[0u8; HANDSHAKE_FRAME_LEN]);
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_in_the_token_is_bad_token() {
        for pos in 0..TOKEN_LEN {
            let mut frame = *HandshakeFrame::new(&token()).as_bytes();
            frame[TOKEN_AT + pos] ^= 0x80;
            assert_eq!(
                run(&frame, 44).0,
                Some(Verdict::Rejected(Rejection::BadToken))
            );
        }
    }

    #[test]
    fn a_wrong_length_prefix_is_rejected_after_four_bytes() {
        for got in [39u32, 41, 0, 12, u32::MAX] {
            let mut frame = got.to_le_bytes().to_vec();
            frame.extend_from_slice(&HandshakeFrame::new(&token())[4..]);
            // Read in 4-byte pieces: nothing after the prefix is read.
            let (verdict, read, parser) = run(&frame, 4);
            assert_eq!(
                verdict,
                Some(Verdict::Rejected(Rejection::WrongLength {
                    got,
                    expected: 40
                }))
            );
            assert_eq!(read, 4);
            assert_eq!(parser.buffer(), &[0u8; HANDSHAKE_FRAME_LEN]);
        }
    }

    #[test]
    fn magic_then_version_are_checked_and_version_1_is_refused() {
        let mut frame = *HandshakeFrame::new(&token()).as_bytes();
        frame[MAGIC_AT] = b'X';
        assert_eq!(
            run(&frame, 44).0,
            Some(Verdict::Rejected(Rejection::BadMagic))
        );
        let v1 = HandshakeFrame::with_version(1, &token());
        assert_eq!(
            run(&v1, 44).0,
            Some(Verdict::Rejected(Rejection::UnsupportedVersion {
                got: 1,
                supported: &[2]
            }))
        );
    }

    #[test]
    fn nothing_past_the_frame_is_read_and_a_verdict_is_final() {
        let mut wire = HandshakeFrame::new(&token()).to_vec();
        wire.extend_from_slice(&[12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        let (verdict, read, mut parser) = run(&wire, 1000);
        assert_eq!(verdict, Some(Verdict::Authenticated));
        assert_eq!(read, HANDSHAKE_FRAME_LEN);
        assert!(parser.is_done());
        assert!(parser.spare().is_empty());
        assert!(parser.verify(&token()).is_err(), "a second verify passed");
    }

    #[test]
    fn incomplete_input_waits_and_the_end_of_the_stream_is_ended() {
        let frame = HandshakeFrame::new(&token());
        let (verdict, read, parser) = run(&frame[..20], 7);
        assert_eq!(verdict, None);
        assert_eq!(read, 20);
        assert_eq!(parser.buffered_len(), 20);
        let mut parser = HandshakeParser::new();
        assert_eq!(pump(&mut parser, &token(), |_| Ok(0)), Some(Verdict::Ended));
    }
}
