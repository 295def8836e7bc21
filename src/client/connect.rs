//! Connecting: where the socket and the token are, the peer check, and the
//! handshake (sections 4 and 12 of proto-spec.md).
//!
//! In order:
//! 1. Socket: the explicit path, else `$KEYHOLE_SOCKET`, else the default
//!    runtime directory's `keyhole.sock`.
//! 2. The peer's uid (`SO_PEERCRED`) must be the expected one (ours, or
//!    `$KEYHOLE_DAEMON_UID`) before any byte is sent, so an impostor on a
//!    stale or forwarded path learns nothing.
//! 3. Token: an explicit token or token file, else `$KEYHOLE_TOKEN` (hex),
//!    else `$KEYHOLE_TOKEN_FILE`, else the runtime directory's
//!    `session-token` (checked: regular file, ours, mode 0600). Read at
//!    every connect, so a restarted daemon's new token is picked up; a
//!    missing file is waited for briefly, since a socket-activated daemon
//!    is started by the connect and writes it just after.
//! 4. Handshake, written with the first requests (see the multiplexer),
//!    then `Welcome` (or the daemon's `Error`, reported to every request as
//!    [`ClientError::AuthRefused`]). Nothing disables authentication.

use std::io;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::ClientError;
use super::mux::Startup;
use crate::error::{FrameError, TokenFileError};
use crate::handshake::HandshakeFrame;
use crate::limits::{MAX_FRAME_LEN, MIN_FRAME_LEN};
use crate::paths::{ENV_DAEMON_UID, ENV_SOCKET, ENV_TOKEN, ENV_TOKEN_FILE, RuntimePaths};
use crate::token::SessionToken;
use crate::token_file::{current_uid, read_token_file};
use crate::transport::{DaemonFrame, PROTOCOL_VERSION, Welcome};

/// How long a connection waits for `Welcome` (connecting included), and a
/// call for its reply, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default bound on the bytes of events a client holds that its
/// application has not taken yet (see [`ConnectOptions::event_budget`]).
pub const DEFAULT_EVENT_BUDGET: usize = 16 * 1024 * 1024;

/// Where to connect and with which token; unset fields come from the
/// environment and defaults at connect time.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    socket: Option<PathBuf>,
    token: Option<Arc<SessionToken>>,
    token_file: Option<PathBuf>,
    timeout: Option<Duration>,
    daemon_uid: Option<u32>,
    event_budget: Option<usize>,
    next_request_id: Option<u64>,
    next_subscription_id: Option<NonZeroU64>,
}

impl ConnectOptions {
    /// Everything from the environment and defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Connect to this socket.
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Use this token.
    pub fn token(mut self, token: Arc<SessionToken>) -> Self {
        self.token = Some(token);
        self
    }

    /// Read the token from this file.
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self
    }

    /// The uid the daemon must run as [default: `$KEYHOLE_DAEMON_UID`, else
    /// our own]. Only needed by a client whose uid the daemon admits with
    /// `--allow-uid`; the token is never sent to any other uid.
    pub fn daemon_uid(mut self, uid: u32) -> Self {
        self.daemon_uid = Some(uid);
        self
    }

    /// How long to wait for `Welcome`, and the default time a call waits for
    /// its reply [default: 10 s].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Bytes of received events the client holds for the application at
    /// most [default: 16 MiB]. When the application does not take its
    /// events and this fills, the client stops reading the socket: replies
    /// wait too, and the daemon's queue for this client fills until the
    /// daemon cuts it as a slow consumer. Nothing is dropped silently.
    pub fn event_budget(mut self, bytes: usize) -> Self {
        self.event_budget = Some(bytes);
        self
    }

    /// The id of the first request of each connection made with these
    /// options [default: 1]. Ids are the client's choice (the daemon only
    /// echoes them): each request after the first takes the previous id
    /// plus one, and 2^64 - 1 is followed by 0. The `Expect` a typed
    /// client writes with the handshake is not counted (it has id 0).
    /// Starting elsewhere keeps ids apart across connections in logs, and
    /// lets a test reach the edges (the conformance kit starts at
    /// 2^64 - 1).
    pub fn next_request_id(mut self, id: u64) -> Self {
        self.next_request_id = Some(id);
        self
    }

    /// The subscription id (`sid`) of the first subscription of each hub
    /// connection made with these options [default: 1]. Each later one
    /// takes the previous sid plus one, 2^64 - 1 followed by 1 (0 is never
    /// a sid: the hub refuses it), skipping any sid still in use on the
    /// connection.
    pub fn next_subscription_id(mut self, sid: NonZeroU64) -> Self {
        self.next_subscription_id = Some(sid);
        self
    }

    pub(crate) fn next_request_id_or_default(&self) -> u64 {
        self.next_request_id.unwrap_or(1)
    }

    pub(crate) fn next_subscription_id_or_default(&self) -> u64 {
        self.next_subscription_id.map_or(1, NonZeroU64::get)
    }

    pub(crate) fn timeout_or_default(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    pub(crate) fn event_budget_or_default(&self) -> usize {
        self.event_budget.unwrap_or(DEFAULT_EVENT_BUDGET).max(1)
    }

    /// The daemon uid these options expect.
    pub fn resolve_daemon_uid(&self) -> Result<u32, ClientError> {
        if let Some(uid) = self.daemon_uid {
            return Ok(uid);
        }
        match std::env::var(ENV_DAEMON_UID) {
            Ok(text) if !text.is_empty() => {
                parse_uid(&text).ok_or(ClientError::BadDaemonUid { value: text })
            }
            _ => Ok(current_uid()),
        }
    }

    /// The socket path these options resolve to.
    pub fn resolve_socket(&self) -> Result<PathBuf, ClientError> {
        if let Some(path) = &self.socket {
            return Ok(path.clone());
        }
        if let Some(path) = std::env::var_os(ENV_SOCKET).filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(path));
        }
        RuntimePaths::from_env()
            .map(|p| p.socket)
            .ok_or(ClientError::NoRuntimeDir)
    }

    /// The token these options resolve to (read now, so a restarted
    /// daemon's new token is picked up).
    pub fn resolve_token(&self) -> Result<Arc<SessionToken>, ClientError> {
        if let Some(token) = &self.token {
            return Ok(Arc::clone(token));
        }
        if let Some(path) = &self.token_file {
            return read_token_file(path)
                .map(Arc::new)
                .map_err(ClientError::TokenFile);
        }
        let mut looked = Vec::new();
        match std::env::var(ENV_TOKEN) {
            Ok(text) if !text.is_empty() => {
                return SessionToken::from_hex(&zeroize::Zeroizing::new(text))
                    .map(Arc::new)
                    .map_err(ClientError::TokenEnv);
            }
            _ => looked.push(format!("${ENV_TOKEN} (unset)")),
        }
        let file = match std::env::var_os(ENV_TOKEN_FILE).filter(|v| !v.is_empty()) {
            Some(path) => PathBuf::from(path),
            None => {
                looked.push(format!("${ENV_TOKEN_FILE} (unset)"));
                match RuntimePaths::from_env() {
                    Some(paths) => paths.token,
                    None => {
                        return Err(ClientError::NoToken {
                            looked: looked.join(", "),
                        });
                    }
                }
            }
        };
        match read_token_file(&file) {
            Ok(token) => Ok(Arc::new(token)),
            Err(TokenFileError::NotFound { path }) => {
                looked.push(format!("{} (no such file)", path.display()));
                Err(ClientError::NoToken {
                    looked: looked.join(", "),
                })
            }
            Err(err) => Err(ClientError::TokenFile(err)),
        }
    }

    /// Connects and checks the peer, then reads the token: what the
    /// connection's startup task needs to write the handshake (with the
    /// first requests) and read `Welcome`, by the connect timeout's end.
    pub(crate) async fn startup(
        &self,
        expect: Option<(&'static str, u32)>,
    ) -> Result<Startup, ClientError> {
        let until = std::time::Instant::now() + self.timeout_or_default();
        let socket = self.resolve_socket()?;
        // The socket first: "daemon not running" says more than "no token".
        let expected_uid = self.resolve_daemon_uid()?;
        let stream = connect_socket_within(&socket, self.timeout_or_default()).await?;
        check_peer_uid(&stream, &socket, expected_uid)?;
        let token = self.resolve_token_after_connect(until).await?;
        Ok(Startup {
            stream,
            handshake: HandshakeFrame::new(&token),
            expect,
            socket,
            expected_uid,
            until,
            first_id: self.next_request_id_or_default(),
        })
    }
}

/// How long a client that has connected waits for a missing token file:
/// a daemon started by this very connection (socket activation) writes it
/// a few milliseconds later. Short, so that a client that looks in the
/// wrong place still says so promptly.
const TOKEN_WAIT: Duration = Duration::from_secs(3);

impl ConnectOptions {
    /// [`Self::resolve_token`], retried while no token file is found (by
    /// the default lookup or at an explicit path), for at most [`TOKEN_WAIT`] and until `until`: the connect succeeded, so a
    /// daemon is there or is being started for us.
    async fn resolve_token_after_connect(
        &self,
        until: std::time::Instant,
    ) -> Result<Arc<SessionToken>, ClientError> {
        let until = until.min(std::time::Instant::now() + TOKEN_WAIT);
        let mut pause = Duration::from_millis(2);
        loop {
            match self.resolve_token() {
                Err(
                    ClientError::NoToken { .. }
                    | ClientError::TokenFile(TokenFileError::NotFound { .. }),
                ) if std::time::Instant::now() + pause < until => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }
}

/// A uid as `KEYHOLE_DAEMON_UID` writes it (section 11 of proto-spec.md):
/// decimal digits only (no sign, no space), 0 to 4294967295.
fn parse_uid(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Connects to `socket`, mapping the OS error to what a user would do.
/// A full listen backlog (`EAGAIN`, a connect storm) is "busy", retried
/// with a growing pause until `timeout`, then [`ClientError::Busy`].
pub async fn connect_socket_within(
    socket: &Path,
    timeout: Duration,
) -> Result<UnixStream, ClientError> {
    let until = std::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match connect_socket(socket).await {
            Err(ClientError::Connect { source, .. })
                if source.kind() == io::ErrorKind::WouldBlock =>
            {
                if std::time::Instant::now() + pause > until {
                    return Err(ClientError::Busy {
                        socket: socket.to_path_buf(),
                        waited: timeout,
                    });
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// One connect to `socket`, mapping the OS error to what a user would do.
pub async fn connect_socket(socket: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(socket)
        .await
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::DaemonNotRunning {
                    socket: socket.to_path_buf(),
                    source,
                }
            }
            io::ErrorKind::PermissionDenied => ClientError::Permission {
                socket: socket.to_path_buf(),
                source,
            },
            _ => ClientError::Connect {
                socket: socket.to_path_buf(),
                source,
            },
        })
}

/// Refuses a peer whose uid is not `expected` (before any byte is sent).
pub fn check_peer_uid(
    stream: &UnixStream,
    socket: &Path,
    expected: u32,
) -> Result<(), ClientError> {
    let cred = stream.peer_cred().map_err(|source| ClientError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    if cred.uid() != expected {
        return Err(ClientError::PeerUidMismatch {
            socket: socket.to_path_buf(),
            expected,
            got: cred.uid(),
        });
    }
    Ok(())
}

/// Sends the handshake on `stream` and waits for `Welcome`. The frame with
/// the token is zeroized as soon as it is written.
pub async fn handshake(
    stream: &mut UnixStream,
    token: &SessionToken,
    timeout: Duration,
) -> Result<Welcome, ClientError> {
    let io = async {
        let frame = HandshakeFrame::new(token);
        let written = stream.write_all(&frame).await;
        drop(frame);
        // A refused write still leaves the daemon's error to read.
        let first = read_first_frame(stream).await;
        match (first, written) {
            (Ok(frame), _) => Ok(frame),
            (Err(err), Ok(())) => Err(err),
            (Err(_), Err(_)) => Err(ClientError::Closed { reason: None }),
        }
    };
    let payload = tokio::time::timeout(timeout, io)
        .await
        .map_err(|_| ClientError::Timeout {
            what: "the daemon's answer to the handshake",
        })??;
    match DaemonFrame::decode(&payload).map_err(ClientError::protocol)? {
        DaemonFrame::Welcome(welcome) => {
            if welcome.protocol_version != PROTOCOL_VERSION {
                return Err(ClientError::Protocol(format!(
                    "Welcome announces protocol version {}; this client speaks {PROTOCOL_VERSION}",
                    welcome.protocol_version
                )));
            }
            let limit = welcome.max_frame_len as usize;
            if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&limit) {
                return Err(ClientError::Protocol(format!(
                    "Welcome announces a frame limit of {limit} bytes, outside {MIN_FRAME_LEN}..={MAX_FRAME_LEN}"
                )));
            }
            Ok(welcome)
        }
        DaemonFrame::Error(error) if error.id.is_none() => Err(ClientError::AuthRefused {
            code: error.code,
            message: error.message,
        }),
        other => Err(ClientError::Protocol(format!(
            "expected Welcome, got {other:?}"
        ))),
    }
}

/// The daemon's first frame, read with the protocol's receive limit.
async fn read_first_frame(stream: &mut UnixStream) -> Result<Bytes, ClientError> {
    let mut prefix = [0u8; 4];
    stream
        .read_exact(&mut prefix)
        .await
        .map_err(|_| ClientError::Closed { reason: None })?;
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME_LEN,
        }
        .into());
    }
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .await
        .map_err(|_| ClientError::Closed { reason: None })?;
    Ok(Bytes::from(payload))
}

#[cfg(test)]
mod tests {
    use super::parse_uid;

    #[test]
    fn a_daemon_uid_is_decimal_digits_only() {
        assert_eq!(parse_uid("0"), Some(0));
        assert_eq!(parse_uid("1000"), Some(1000));
        assert_eq!(parse_uid("007"), Some(7));
        assert_eq!(parse_uid("4294967295"), Some(u32::MAX));
        for bad in [
            "",
            "+5",
            "-1",
            " 0",
            "0 ",
            "1e3",
            "4294967296",
            "0x10",
            "１",
        ] {
            assert_eq!(parse_uid(bad), None, "{bad:?}");
        }
    }
}
