//! The plumbing of the fd-passing flood: a connection made by a child
//! process of its own, passed back over a Unix socketpair with
//! `SCM_RIGHTS`, after which the child exits. The daemon reads the peer's
//! pid with `SO_PEERCRED`, which is the pid of the process that called
//! `connect`: here, every connection's is that of a dead process, a
//! different one each time, while one live process holds them all.
//!
//! - [`child_main`] is the child (`--fd-child SOCKET`, with the socketpair
//!   as its stdin): connect, send the connected socket with its pid and
//!   the time of the connect, exit. The socketpair is `SOCK_DGRAM`, so
//!   that the children's messages keep their boundaries.
//! - [`Passer`] is the parent's side: threads that spawn and reap children
//!   on request, and a task that receives what they send.
//!
//! Only rustix's safe `sendmsg`/`recvmsg` with its ancillary buffers; no
//! `unsafe`, no `fork` (the children are spawned, not forked).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixDatagram;
use tokio::sync::mpsc as async_mpsc;

use super::wire::Conn;

/// What a child sends with the socket: its pid (u32) and the wall-clock
/// times (u64 ns since the epoch) just before and just after its connect,
/// little-endian.
const MSG_LEN: usize = 20;

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The child: connects to `socket`, sends the connected socket over its
/// stdin (one end of a `SOCK_DGRAM` socketpair) and exits.
pub fn child_main(socket: &str) -> ExitCode {
    // Failures are told by the exit status (the parent counts them).
    let started = wall_ns();
    let Ok(stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return ExitCode::from(2);
    };
    let mut data = [0u8; MSG_LEN];
    data[..4].copy_from_slice(&std::process::id().to_le_bytes());
    data[4..12].copy_from_slice(&started.to_le_bytes());
    data[12..].copy_from_slice(&wall_ns().to_le_bytes());
    let fds = [stream.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return ExitCode::from(3);
    }
    let stdin = std::io::stdin();
    match rustix::net::sendmsg(
        stdin.as_fd(),
        &[IoSlice::new(&data)],
        &mut control,
        SendFlags::NOSIGNAL,
    ) {
        Ok(_) => ExitCode::SUCCESS,
        // The parent has gone (the attack stopped), say.
        Err(_) => ExitCode::from(4),
    }
}

/// What the parent gets for one request.
pub enum Passed {
    /// A connection, made by the child with this pid (which has exited or
    /// is about to), at the time the child took.
    Conn { conn: Conn, pid: u32 },
    /// The child could not be spawned, or failed.
    Failed(String),
}

/// The parent's side: [`Passer::request`] asks for one more connection
/// (one more child), [`Passer::next`] yields what arrives.
pub struct Passer {
    want: Option<mpsc::Sender<()>>,
    rx: async_mpsc::UnboundedReceiver<Passed>,
    receiver: tokio::task::JoinHandle<()>,
    /// Our end of the children's socketpair, kept until [`Passer::stop`].
    _theirs: Arc<OwnedFd>,
}

impl Passer {
    /// Starts `spawners` threads, each spawning one child at a time and
    /// waiting for its exit (so no zombie is left). Call inside a tokio
    /// runtime.
    pub fn start(socket: &Path, spawners: usize) -> Self {
        let (ours, theirs) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("non-blocking socketpair");
        let theirs = Arc::new(OwnedFd::from(theirs));
        let (tx, rx) = async_mpsc::unbounded_channel();
        let (want_tx, want_rx) = mpsc::channel::<()>();
        let want_rx = Arc::new(Mutex::new(want_rx));
        let exe: PathBuf = std::env::current_exe().expect("current exe");
        for _ in 0..spawners {
            let (want_rx, tx, exe, theirs) = (
                Arc::clone(&want_rx),
                tx.clone(),
                exe.clone(),
                Arc::clone(&theirs),
            );
            let socket = socket.to_path_buf();
            std::thread::spawn(move || {
                loop {
                    let next = want_rx.lock().unwrap().recv();
                    if next.is_err() {
                        return;
                    }
                    let end = match theirs.try_clone() {
                        Ok(end) => end,
                        Err(e) => {
                            let _ = tx.send(Passed::Failed(format!("dup: {e}")));
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    let status = Command::new(&exe)
                        .arg("--fd-child")
                        .arg(&socket)
                        .stdin(Stdio::from(end))
                        .stdout(Stdio::null())
                        .stderr(Stdio::inherit())
                        .status();
                    match status {
                        Ok(s) if s.success() => {}
                        // 2: connect failed; 3, 4: could not pass it.
                        Ok(s) => {
                            let _ = tx.send(Passed::Failed(format!("child {s}")));
                        }
                        Err(e) => {
                            let _ = tx.send(Passed::Failed(format!("spawn: {e}")));
                        }
                    }
                }
            });
        }
        let ours = UnixDatagram::from_std(ours).expect("register the socketpair");
        let receiver = tokio::spawn(receive(ours, tx));
        Self {
            want: Some(want_tx),
            rx,
            receiver,
            _theirs: theirs,
        }
    }

    /// One more child, one more connection.
    pub fn request(&self) {
        if let Some(want) = &self.want {
            let _ = want.send(());
        }
    }

    pub async fn next(&mut self) -> Option<Passed> {
        self.rx.recv().await
    }

    /// No more children; what is still on its way is closed. The spawner
    /// threads finish the child they are waiting for and end.
    pub fn stop(mut self) {
        self.want = None;
        self.receiver.abort();
        self.rx.close();
    }
}

/// Receives the children's messages until the socketpair fails.
async fn receive(socket: UnixDatagram, tx: async_mpsc::UnboundedSender<Passed>) {
    loop {
        if let Err(e) = socket.readable().await {
            let _ = tx.send(Passed::Failed(format!("socketpair: {e}")));
            return;
        }
        let got = socket.try_io(Interest::READABLE, || {
            let mut data = [0u8; MSG_LEN];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(
                &socket,
                &mut [IoSliceMut::new(&mut data)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let mut fds: Vec<OwnedFd> = Vec::new();
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = message {
                    fds.extend(rights);
                }
            }
            Ok((msg.bytes, data, fds))
        });
        let (len, data, mut fds) = match got {
            Ok(got) => got,
            // Not readable after all: wait again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                let _ = tx.send(Passed::Failed(format!("recvmsg: {e}")));
                return;
            }
        };
        let received = Instant::now();
        if len != MSG_LEN || fds.len() != 1 {
            let _ = tx.send(Passed::Failed(format!(
                "a message of {len} bytes with {} descriptors",
                fds.len()
            )));
            continue;
        }
        let pid = u32::from_le_bytes(data[..4].try_into().unwrap());
        let ns = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
        // The connect's times on this process's clock.
        let now_ns = wall_ns();
        let ago = |at_ns: u64| {
            let age = Duration::from_nanos(now_ns.saturating_sub(at_ns));
            received.checked_sub(age).unwrap_or(received)
        };
        let (started, connected_at) = (ago(ns(4)), ago(ns(12)));
        let std_stream = std::os::unix::net::UnixStream::from(fds.pop().unwrap());
        let stream = std_stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(std_stream));
        let passed = match stream {
            Ok(stream) => Passed::Conn {
                conn: Conn::from_stream(stream, started, connected_at),
                pid,
            },
            Err(e) => Passed::Failed(format!("register: {e}")),
        };
        if tx.send(passed).is_err() {
            return;
        }
    }
}
