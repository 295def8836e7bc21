//! The descriptor-spraying attacker's connections (proto-spec.md section
//! 19), run by the `mixed` attacker among its short-lived kinds. Every
//! descriptor sent is the write end of a pipe whose read end the attacker
//! keeps, so that "the daemon closed it" is seen, not assumed: the read end
//! sees EOF once no process holds the write end.
//!
//! - [`Spray::Handshake`]: descriptors attached to the handshake (the
//!   daemon reads it without an ancillary buffer: closed unread, then
//!   `Welcome`);
//! - [`Spray::NotAccepted`]: after authentication, without `AcceptFds`, a
//!   `CallFds` with its descriptors (`DescriptorsNotAccepted` with the id,
//!   closed unread, the connection stays);
//! - [`Spray::Unannounced`]: after `AcceptFds`, descriptors attached to a
//!   `Ping` (its `Ack`, then `DescriptorMismatch` and the close, with
//!   nothing sent after it);
//! - [`Spray::TooMany`]: after `AcceptFds`, 253 descriptors (the kernel's
//!   most for one `sendmsg`; one pipe, repeated) on a `CallFds`: the kernel
//!   cuts them to the daemon's buffer (`MSG_CTRUNC`), `TooManyDescriptors`
//!   and the close;
//! - [`Spray::Missing`]: after `AcceptFds`, a `CallFds` announcing
//!   descriptors sent without any (`DescriptorMismatch`, close);
//! - [`Spray::OddControl`]: after `AcceptFds`, control data the daemon does
//!   not expect, as far as rustix's safe API builds it: an `SCM_RIGHTS`
//!   message holding no descriptor and an `SCM_CREDENTIALS` message, each
//!   with a `Ping` (answered as without it), and a `CallFds` whose two
//!   descriptors go as two `SCM_RIGHTS` messages of one `sendmsg` (the
//!   kernel delivers them as one: the hub's `BadMemfd`, as for any
//!   `PublishMemfd` with two). A malformed or truncated `cmsghdr` cannot be
//!   built without `unsafe`; the kernel's own truncation (`MSG_CTRUNC`) is
//!   [`Spray::TooMany`]'s;
//! - [`Spray::OverFrame`]: after `AcceptFds`, a frame sent one `sendmsg` a
//!   byte, each with 8 descriptors: no frame can claim them, so
//!   `DescriptorMismatch` at the first, not once the frame is whole.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use keyhole::handshake::HandshakeFrame;
use keyhole::hub::{HubError, HubRequest};
use keyhole::limits::{MAX_FDS_PER_FRAME, MAX_FRAME_LEN};
use keyhole::token::SessionToken;
use keyhole::transport::{ErrorCode, RequestKind, TransportCode, encode_call_fds, encode_request};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tokio::io::Interest;

use super::wire::{self, Conn, End, Msg, Req};

/// The descriptors one `sendmsg` may carry on Linux (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// How long a descriptor the daemon must have closed may take to be seen
/// closed (the read end's EOF) after the answer that says so.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// One kind of descriptor-spraying connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Spray {
    Handshake,
    NotAccepted,
    Unannounced,
    TooMany,
    Missing,
    OddControl,
    OverFrame,
}

/// The outcome each kind must have (the pre-auth eviction aside).
pub const HANDSHAKE_OK: &str =
    "Welcome (descriptors closed unread), Ack, closed after our half-close";
pub const NOT_ACCEPTED_OK: &str = "Error DescriptorsNotAccepted with its id (descriptors closed unread), Ack, closed after our half-close";
pub const UNANNOUNCED_OK: &str = "Ack, then Error DescriptorMismatch and closed";
pub const TOO_MANY_OK: &str = "Error TooManyDescriptors and closed";
pub const MISSING_OK: &str = "Error DescriptorMismatch and closed";
pub const ODD_OK: &str = "Ack to empty SCM_RIGHTS, Ack to SCM_CREDENTIALS, BadMemfd with its id for 2 SCM_RIGHTS messages, Ack, closed after our half-close";
pub const OVER_FRAME_OK: &str = "Error DescriptorMismatch at the first stray sendmsg, closed";

impl Spray {
    pub fn name(self) -> &'static str {
        match self {
            Spray::Handshake => "fd spray: descriptors with the handshake",
            Spray::NotAccepted => "fd spray: CallFds with descriptors, no AcceptFds",
            Spray::Unannounced => "fd spray: after AcceptFds, descriptors on a Ping",
            Spray::TooMany => "fd spray: after AcceptFds, 253 descriptors in one sendmsg",
            Spray::Missing => "fd spray: after AcceptFds, CallFds whose descriptors never came",
            Spray::OddControl => "fd spray: after AcceptFds, odd control messages",
            Spray::OverFrame => "fd spray: after AcceptFds, 8 descriptors a byte over a frame",
        }
    }

    /// The one outcome it may have.
    pub fn expected(self) -> &'static str {
        match self {
            Spray::Handshake => HANDSHAKE_OK,
            Spray::NotAccepted => NOT_ACCEPTED_OK,
            Spray::Unannounced => UNANNOUNCED_OK,
            Spray::TooMany => TOO_MANY_OK,
            Spray::Missing => MISSING_OK,
            Spray::OddControl => ODD_OK,
            Spray::OverFrame => OVER_FRAME_OK,
        }
    }

    pub const ALL: [Spray; 7] = [
        Spray::Handshake,
        Spray::NotAccepted,
        Spray::Unannounced,
        Spray::TooMany,
        Spray::Missing,
        Spray::OddControl,
        Spray::OverFrame,
    ];
}

/// How one spraying connection went.
pub struct Verdict {
    pub outcome: Result<String, String>,
    /// From our last byte to the daemon's close, when the daemon closed.
    pub closed_in: Option<Duration>,
    /// Descriptors handed to the kernel with our `sendmsg`s.
    pub sent: u64,
    /// Pipes whose write end we sent and that were still open
    /// [`CLOSE_GRACE`] after the daemon had to have closed them.
    pub kept: u64,
}

/// Ancillary data for one `sendmsg`.
enum Control<'a> {
    /// These `SCM_RIGHTS` messages (one, usually).
    Rights(Vec<&'a [BorrowedFd<'a>]>),
    /// One `SCM_RIGHTS` message with no descriptor.
    EmptyRights,
    /// `SCM_CREDENTIALS` with our own pid, uid and gid.
    Credentials,
}

/// Pipes: read ends (kept, non-blocking) and write ends (sent).
fn pipes(n: usize) -> Result<(Vec<OwnedFd>, Vec<OwnedFd>), String> {
    let mut reads = Vec::with_capacity(n);
    let mut writes = Vec::with_capacity(n);
    for _ in 0..n {
        let (read, write) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )
        .map_err(|e| format!("harness: pipe: {e}"))?;
        reads.push(read);
        writes.push(write);
    }
    Ok((reads, writes))
}

fn sendmsg(
    stream: &tokio::net::UnixStream,
    bytes: &[u8],
    control: &Control<'_>,
) -> io::Result<usize> {
    let parts: Vec<&[BorrowedFd<'_>]> = match control {
        Control::Rights(parts) => parts.clone(),
        Control::EmptyRights => vec![&[]],
        Control::Credentials => Vec::new(),
    };
    let mut len: usize = parts
        .iter()
        .map(|p| rustix::cmsg_space!(ScmRights(p.len())))
        .sum();
    if matches!(control, Control::Credentials) {
        len += rustix::cmsg_space!(ScmCredentials(1));
    }
    let mut space = vec![MaybeUninit::<u8>::uninit(); len];
    let mut buffer = SendAncillaryBuffer::new(&mut space);
    for part in &parts {
        if !buffer.push(SendAncillaryMessage::ScmRights(part)) {
            return Err(io::Error::other("the control buffer is too small"));
        }
    }
    if matches!(control, Control::Credentials) {
        let ucred = rustix::net::UCred {
            pid: rustix::process::getpid(),
            uid: rustix::process::getuid(),
            gid: rustix::process::getgid(),
        };
        if !buffer.push(SendAncillaryMessage::ScmCredentials(ucred)) {
            return Err(io::Error::other("the control buffer is too small"));
        }
    }
    Ok(rustix::net::sendmsg(
        stream,
        &[IoSlice::new(bytes)],
        &mut buffer,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?)
}

/// Sends `bytes` with `control` on their first byte (one `sendmsg`), the
/// rest, if it sent only part, with plain writes.
async fn send_with(conn: &mut Conn, bytes: &[u8], control: Control<'_>) -> io::Result<()> {
    let sent = loop {
        conn.stream.writable().await?;
        match conn.stream.try_io(Interest::WRITABLE, || {
            sendmsg(&conn.stream, bytes, &control)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    conn.last_write = Instant::now();
    if sent < bytes.len() {
        conn.send(&bytes[sent..]).await?;
    }
    Ok(())
}

/// How many of `reads` are still open (their write end held somewhere)
/// after waiting up to `grace` for all of them to see EOF.
async fn still_open(reads: &[OwnedFd], grace: Duration) -> u64 {
    let deadline = Instant::now() + grace;
    loop {
        let open = reads
            .iter()
            .filter(|read| {
                let mut byte = [0u8; 1];
                !matches!(rustix::io::read(read, &mut byte), Ok(0))
            })
            .count() as u64;
        if open == 0 || Instant::now() >= deadline {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn request(id: u64, kind: RequestKind) -> Vec<u8> {
    let mut dst = BytesMut::new();
    let _ = encode_request::<()>(&mut dst, id, kind, None, MAX_FRAME_LEN);
    dst.to_vec()
}

fn call_fds(id: u64, count: u32) -> Vec<u8> {
    let mut dst = BytesMut::new();
    let req = HubRequest::PublishMemfd {
        topic: "torture.fds".into(),
    };
    let _ = encode_call_fds(&mut dst, id, count, &req, MAX_FRAME_LEN);
    dst.to_vec()
}

async fn expect(conn: &mut Conn, deadline: Instant, want: Msg, what: &str) -> Result<(), String> {
    match conn.read_msg(deadline).await {
        Ok(got) if got == want => Ok(()),
        Ok(got) => Err(format!(
            "{what}: {} was due, got {}",
            wire::describe(&want),
            wire::describe(&got)
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

async fn expect_error(
    conn: &mut Conn,
    deadline: Instant,
    id: Option<u64>,
    code: ErrorCode,
    what: &str,
) -> Result<(), String> {
    match conn.read_msg(deadline).await {
        Ok(Msg::Error {
            id: got,
            code: got_code,
            ..
        }) if got == id && got_code == code => Ok(()),
        Ok(got) => Err(format!(
            "{what}: Error {}{} was due, got {}",
            wire::code_name(code),
            if id.is_some() { " with its id" } else { "" },
            wire::describe(&got)
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Nothing more, then the daemon's close (after ours, or of its own):
/// the time from our last byte to it.
async fn expect_close(conn: &mut Conn, deadline: Instant, what: &str) -> Result<Duration, String> {
    let tail = conn.read_to_end(deadline, None).await;
    if tail.end == End::Open {
        return Err(format!("{what}: NOT CLOSED by the deadline"));
    }
    let (frames, partial) = wire::split_frames(&tail.bytes);
    if let Some(first) = frames.first() {
        return Err(format!(
            "{what}: {} frames more before the close, the first {}",
            frames.len(),
            wire::decode(first).map_or_else(|e| e, |m| wire::describe(&m))
        ));
    }
    if partial != 0 {
        return Err(format!(
            "{what}: {partial} bytes of a partial frame before the close"
        ));
    }
    Ok(tail.at - conn.last_write)
}

/// Runs one spraying connection on `conn` (connected, nothing sent).
/// `random` sizes it; `bound` is the close bound.
pub async fn run(
    kind: Spray,
    conn: &mut Conn,
    token: &SessionToken,
    random: u64,
    bound: Duration,
) -> Verdict {
    let mut verdict = Verdict {
        outcome: Ok(String::new()),
        closed_in: None,
        sent: 0,
        kept: 0,
    };
    let n = 1 + (random % MAX_FDS_PER_FRAME as u64) as usize;
    let deadline = Instant::now() + bound + Duration::from_secs(5);
    let outcome = async {
        if kind == Spray::Handshake {
            return handshake(conn, token, n, deadline, &mut verdict).await;
        }
        match conn.authenticate(token, Duration::from_secs(10)).await {
            Err(e) if e.contains("TooManyUnauthenticated") => {
                return Ok("Error TooManyUnauthenticated".into());
            }
            Err(e) => return Err(format!("handshake: {e}")),
            Ok(()) => {}
        }
        if kind == Spray::NotAccepted {
            return not_accepted(conn, n, deadline, &mut verdict).await;
        }
        conn.send(&request(1, RequestKind::AcceptFds))
            .await
            .map_err(|e| e.to_string())?;
        expect(conn, deadline, Msg::Ack(1), "AcceptFds").await?;
        accepted(kind, conn, n, deadline, &mut verdict).await
    }
    .await;
    verdict.outcome = outcome;
    verdict
}

async fn handshake(
    conn: &mut Conn,
    token: &SessionToken,
    n: usize,
    deadline: Instant,
    verdict: &mut Verdict,
) -> Result<String, String> {
    let (reads, writes) = pipes(n)?;
    let fds: Vec<BorrowedFd<'_>> = writes.iter().map(AsFd::as_fd).collect();
    let sent = send_with(
        conn,
        &HandshakeFrame::new(token),
        Control::Rights(vec![&fds]),
    )
    .await;
    drop(fds);
    drop(writes);
    sent.map_err(|e| format!("handshake write: {e}"))?;
    verdict.sent += n as u64;
    let first = conn.read_msg(deadline).await;
    // Read unread or not at all, the descriptors are closed either way.
    verdict.kept = still_open(&reads, CLOSE_GRACE).await;
    match first? {
        Msg::Welcome(_) => {}
        Msg::Error {
            id: None,
            code: ErrorCode::Transport(TransportCode::TooManyUnauthenticated),
            ..
        } => return Ok("Error TooManyUnauthenticated".into()),
        other => {
            return Err(format!(
                "the handshake answered with {}",
                wire::describe(&other)
            ));
        }
    }
    kept(verdict, "sent with the handshake")?;
    conn.send(&request(2, RequestKind::Ping))
        .await
        .map_err(|e| e.to_string())?;
    expect(conn, deadline, Msg::Ack(2), "Ping").await?;
    conn.half_close().await;
    verdict.closed_in = Some(expect_close(conn, deadline, "after our half-close").await?);
    Ok(HANDSHAKE_OK.into())
}

fn kept(verdict: &Verdict, what: &str) -> Result<(), String> {
    if verdict.kept > 0 {
        return Err(format!(
            "{} of the descriptors {what} still open {:.0} s after the daemon had to close them: KEPT",
            verdict.kept,
            CLOSE_GRACE.as_secs_f64()
        ));
    }
    Ok(())
}

async fn not_accepted(
    conn: &mut Conn,
    n: usize,
    deadline: Instant,
    verdict: &mut Verdict,
) -> Result<String, String> {
    let (reads, writes) = pipes(n)?;
    let fds: Vec<BorrowedFd<'_>> = writes.iter().map(AsFd::as_fd).collect();
    let sent = send_with(conn, &call_fds(2, n as u32), Control::Rights(vec![&fds])).await;
    drop(fds);
    drop(writes);
    sent.map_err(|e| format!("CallFds write: {e}"))?;
    verdict.sent += n as u64;
    let answer = expect_error(
        conn,
        deadline,
        Some(2),
        ErrorCode::Transport(TransportCode::DescriptorsNotAccepted),
        "CallFds before AcceptFds",
    )
    .await;
    verdict.kept = still_open(&reads, CLOSE_GRACE).await;
    answer?;
    kept(verdict, "sent before AcceptFds")?;
    conn.send(&request(3, RequestKind::Ping))
        .await
        .map_err(|e| e.to_string())?;
    expect(conn, deadline, Msg::Ack(3), "Ping after the refusal").await?;
    conn.half_close().await;
    verdict.closed_in = Some(expect_close(conn, deadline, "after our half-close").await?);
    Ok(NOT_ACCEPTED_OK.into())
}

/// The kinds that send `AcceptFds` first (answered already).
async fn accepted(
    kind: Spray,
    conn: &mut Conn,
    n: usize,
    deadline: Instant,
    verdict: &mut Verdict,
) -> Result<String, String> {
    let mismatch = ErrorCode::Transport(TransportCode::DescriptorMismatch);
    match kind {
        Spray::Unannounced => {
            let (reads, writes) = pipes(n)?;
            let fds: Vec<BorrowedFd<'_>> = writes.iter().map(AsFd::as_fd).collect();
            let sent = send_with(
                conn,
                &request(2, RequestKind::Ping),
                Control::Rights(vec![&fds]),
            )
            .await;
            drop(fds);
            drop(writes);
            sent.map_err(|e| format!("Ping write: {e}"))?;
            verdict.sent += n as u64;
            let answer = async {
                expect(conn, deadline, Msg::Ack(2), "Ping with descriptors").await?;
                expect_error(conn, deadline, None, mismatch, "after the Ping's Ack").await?;
                expect_close(conn, deadline, "after DescriptorMismatch").await
            }
            .await;
            verdict.kept = still_open(&reads, CLOSE_GRACE).await;
            verdict.closed_in = Some(answer?);
            kept(verdict, "sent with a Ping")?;
            Ok(UNANNOUNCED_OK.into())
        }
        Spray::TooMany => {
            let (reads, writes) = pipes(1)?;
            let fds = vec![writes[0].as_fd(); SCM_MAX_FD];
            let sent = send_with(conn, &call_fds(2, n as u32), Control::Rights(vec![&fds])).await;
            drop(fds);
            drop(writes);
            sent.map_err(|e| format!("CallFds write: {e}"))?;
            verdict.sent += SCM_MAX_FD as u64;
            let answer = async {
                expect_error(
                    conn,
                    deadline,
                    None,
                    ErrorCode::Transport(TransportCode::TooManyDescriptors),
                    "253 descriptors",
                )
                .await?;
                expect_close(conn, deadline, "after TooManyDescriptors").await
            }
            .await;
            verdict.kept = still_open(&reads, CLOSE_GRACE).await;
            verdict.closed_in = Some(answer?);
            kept(verdict, "253 times")?;
            Ok(TOO_MANY_OK.into())
        }
        Spray::Missing => {
            conn.send(&call_fds(2, n as u32))
                .await
                .map_err(|e| e.to_string())?;
            expect_error(
                conn,
                deadline,
                None,
                mismatch,
                "CallFds without its descriptors",
            )
            .await?;
            verdict.closed_in =
                Some(expect_close(conn, deadline, "after DescriptorMismatch").await?);
            Ok(MISSING_OK.into())
        }
        Spray::OddControl => {
            send_with(conn, &request(2, RequestKind::Ping), Control::EmptyRights)
                .await
                .map_err(|e| format!("Ping with an empty SCM_RIGHTS: {e}"))?;
            expect(conn, deadline, Msg::Ack(2), "Ping with an empty SCM_RIGHTS").await?;
            send_with(conn, &request(3, RequestKind::Ping), Control::Credentials)
                .await
                .map_err(|e| format!("Ping with SCM_CREDENTIALS: {e}"))?;
            expect(conn, deadline, Msg::Ack(3), "Ping with SCM_CREDENTIALS").await?;
            let (reads, writes) = pipes(2)?;
            let fds: Vec<BorrowedFd<'_>> = writes.iter().map(AsFd::as_fd).collect();
            let sent = send_with(
                conn,
                &call_fds(4, 2),
                Control::Rights(vec![&fds[..1], &fds[1..]]),
            )
            .await;
            drop(fds);
            drop(writes);
            sent.map_err(|e| format!("CallFds write: {e}"))?;
            verdict.sent += 2;
            let answer = expect_error(
                conn,
                deadline,
                Some(4),
                ErrorCode::Service(HubError::BAD_MEMFD),
                "PublishMemfd with two pipes in two SCM_RIGHTS messages",
            )
            .await;
            verdict.kept = still_open(&reads, CLOSE_GRACE).await;
            answer?;
            kept(verdict, "refused with BadMemfd")?;
            conn.send(&request(5, RequestKind::Ping))
                .await
                .map_err(|e| e.to_string())?;
            expect(conn, deadline, Msg::Ack(5), "Ping after BadMemfd").await?;
            conn.half_close().await;
            verdict.closed_in = Some(expect_close(conn, deadline, "after our half-close").await?);
            Ok(ODD_OK.into())
        }
        Spray::OverFrame => {
            let (reads, writes) = pipes(1)?;
            let frame = wire::request(
                2,
                Req::Hub(HubRequest::Publish {
                    topic: "torture.fds".into(),
                    payload: keyhole::Payload::from(vec![7u8; 200]),
                }),
            );
            conn.send(&frame[..4]).await.map_err(|e| e.to_string())?;
            let eight = vec![writes[0].as_fd(); MAX_FDS_PER_FRAME];
            for byte in &frame[4..36] {
                // Refused once the daemon has closed: that is the point.
                if send_with(
                    conn,
                    std::slice::from_ref(byte),
                    Control::Rights(vec![&eight]),
                )
                .await
                .is_err()
                {
                    break;
                }
                verdict.sent += MAX_FDS_PER_FRAME as u64;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            drop(eight);
            drop(writes);
            let answer = async {
                expect_error(conn, deadline, None, mismatch, "descriptors over a frame").await?;
                expect_close(conn, deadline, "after DescriptorMismatch").await
            }
            .await;
            verdict.kept = still_open(&reads, CLOSE_GRACE).await;
            verdict.closed_in = Some(answer?);
            kept(verdict, "sprayed over a frame")?;
            Ok(OVER_FRAME_OK.into())
        }
        Spray::Handshake | Spray::NotAccepted => unreachable!("not an AcceptFds kind: {kind:?}"),
    }
}
