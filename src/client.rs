//! The async client: connect, check the peer, hand over the token, then
//! pipelined requests and event subscriptions over one connection.
//!
//! Connecting, in order:
//! 1. Socket: the explicit path, else `$KEYHOLE_SOCKET`, else the default
//!    runtime directory's `keyhole.sock`.
//! 2. Token: an explicit token or token file, else `$KEYHOLE_TOKEN` (hex),
//!    else `$KEYHOLE_TOKEN_FILE`, else the runtime directory's
//!    `session-token` (checked: regular file, ours, mode 0600).
//! 3. The peer's uid (SO_PEERCRED) must be ours before the token is sent, so
//!    an impostor on a stale or forwarded path learns nothing.
//! 4. Handshake, then `Welcome` (or the daemon's `Error`, as
//!    [`ClientError::AuthRefused`]). Nothing disables authentication.
//!
//! After that a writer task sends requests (ids assigned in order, batches
//! written at once) and a reader task matches replies, which come back in
//! request order, and routes events to [`Subscription`]s. Reading and
//! writing run independently, so a long pipeline cannot deadlock.
//!
//! Reconnecting: a daemon restart rotates the token. [`ConnectOptions`]
//! re-reads the token at every connect, so the reconnect path is simply to
//! connect again; [`ConnectOptions::connect_retrying`] does that until a
//! deadline while the daemon comes back.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use crate::codec::{FrameCodec, decode_server_message, encode_message};
use crate::error::{DaemonError, FrameError, TokenFileError, TokenParseError};
use crate::handshake::encode_handshake;
use crate::limits::{MAX_FRAME_LEN, WRITE_BATCH_BYTES};
use crate::message::{CloseReason, ErrorCode, Request, RequestBody, ServerMessage, Status};
use crate::paths::{ENV_DAEMON_UID, ENV_SOCKET, ENV_TOKEN, ENV_TOKEN_FILE, RuntimePaths};
use crate::token::SessionToken;
use crate::token_file::{current_uid, read_token_file};

/// How long [`ConnectOptions::connect`] waits for `Welcome` by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the client, by what a user would do about them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// None of `KEYHOLE_DIR`, `XDG_RUNTIME_DIR`, `HOME` is set and no explicit path was given.
    #[error("cannot locate the runtime directory: set KEYHOLE_DIR or KEYHOLE_SOCKET")]
    NoRuntimeDir,
    /// Nothing listens on the socket (missing, or a stale socket file).
    #[error("daemon not running: {socket}: {source}")]
    DaemonNotRunning {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The socket exists but we may not connect to it.
    #[error("permission denied: {socket}: {source}")]
    Permission {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Connecting failed otherwise.
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// No token anywhere the client looked.
    #[error(
        "no session token: looked at {looked}. Is keyholed running? For a forwarded socket, supply the token: KEYHOLE_TOKEN=$(ssh host keyhole token) keyhole --socket fwd.sock ping"
    )]
    NoToken {
        /// Where it looked, in order.
        looked: String,
    },
    /// The token file exists but is refused (permissions, owner, content).
    #[error("{0}")]
    TokenFile(#[source] TokenFileError),
    /// `KEYHOLE_DAEMON_UID` is set but is not a uid.
    #[error("KEYHOLE_DAEMON_UID is not a uid: {value:?}")]
    BadDaemonUid {
        /// The value found.
        value: String,
    },
    /// `KEYHOLE_TOKEN` is set but is not a token.
    #[error("KEYHOLE_TOKEN is not a token: {0}")]
    TokenEnv(#[source] TokenParseError),
    /// The socket is served by another uid: the token was not sent.
    #[error("{socket} is served by uid {got}, not uid {expected}; refusing to send the token")]
    PeerUidMismatch {
        /// The socket path.
        socket: PathBuf,
        /// Our uid.
        expected: u32,
        /// The peer's uid.
        got: u32,
    },
    /// The daemon refused the handshake (or the connection) with this error.
    #[error("authentication refused by the daemon ({code:?}): {message}")]
    AuthRefused {
        /// The daemon's code.
        code: ErrorCode,
        /// The daemon's text.
        message: String,
    },
    /// No answer in time.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
    },
    /// The daemon answered a request with an error.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The connection is closed: `Closing{reason}` from the daemon, or the
    /// socket ended (`None`).
    #[error("connection closed{}", match reason { Some(r) => format!(" by the daemon: {r:?}"), None => String::new() })]
    Closed {
        /// The daemon's reason, if it sent one.
        reason: Option<CloseReason>,
    },
    /// The daemon sent something the protocol does not allow here.
    #[error("protocol violation by the daemon: {0}")]
    Protocol(String),
    /// Framing or decoding failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl ClientError {
    /// The daemon's error code, when the daemon sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::AuthRefused { code, .. } => Some(*code),
            ClientError::Daemon(e) => Some(e.code),
            _ => None,
        }
    }
}

/// An event received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The topic.
    pub topic: String,
    /// Per-topic sequence number; consecutive while subscribed.
    pub sequence: u64,
    /// The publisher's bytes.
    pub payload: Bytes,
}

/// What the daemon said in `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version in use.
    pub protocol_version: u32,
    /// The daemon's software version.
    pub daemon_version: String,
    /// This connection's id in the daemon's logs.
    pub connection_id: u64,
    /// Largest frame payload the daemon accepts.
    pub max_frame_len: u32,
}

/// Where to connect and with which token; unset fields come from the
/// environment and defaults at connect time.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    socket: Option<PathBuf>,
    token: Option<SessionToken>,
    token_file: Option<PathBuf>,
    handshake_timeout: Option<Duration>,
    daemon_uid: Option<u32>,
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
    pub fn token(mut self, token: SessionToken) -> Self {
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

    /// The daemon uid these options expect.
    pub fn resolve_daemon_uid(&self) -> Result<u32, ClientError> {
        if let Some(uid) = self.daemon_uid {
            return Ok(uid);
        }
        match std::env::var(ENV_DAEMON_UID) {
            Ok(text) if !text.is_empty() => text
                .trim()
                .parse()
                .map_err(|_| ClientError::BadDaemonUid { value: text }),
            _ => Ok(current_uid()),
        }
    }

    /// How long to wait for `Welcome`.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = Some(timeout);
        self
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
    pub fn resolve_token(&self) -> Result<SessionToken, ClientError> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        if let Some(path) = &self.token_file {
            return read_token_file(path).map_err(ClientError::TokenFile);
        }
        let mut looked = Vec::new();
        match std::env::var(ENV_TOKEN) {
            Ok(text) if !text.is_empty() => {
                return SessionToken::from_hex(&zeroize::Zeroizing::new(text))
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
            Ok(token) => Ok(token),
            Err(TokenFileError::NotFound { path }) => {
                looked.push(format!("{} (no such file)", path.display()));
                Err(ClientError::NoToken {
                    looked: looked.join(", "),
                })
            }
            Err(err) => Err(ClientError::TokenFile(err)),
        }
    }

    /// Connects, checks the peer, authenticates and returns a ready client.
    pub async fn connect(&self) -> Result<Client, ClientError> {
        let socket = self.resolve_socket()?;
        // The socket first: "daemon not running" says more than "no token".
        let expected_uid = self.resolve_daemon_uid()?;
        let stream = connect_socket(&socket).await?;
        check_peer_uid(&stream, &socket, expected_uid)?;
        let token = self.resolve_token()?;
        let timeout = self.handshake_timeout.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
        Client::from_stream(stream, &token, timeout).await
    }

    /// [`Self::connect`] again and again until `deadline` passes, while the
    /// daemon is not (yet) there or its token is being rotated. The
    /// documented reconnect path after a daemon restart.
    pub async fn connect_retrying(&self, deadline: Duration) -> Result<Client, ClientError> {
        let until = Instant::now() + deadline;
        loop {
            match self.connect().await {
                Ok(client) => return Ok(client),
                Err(err) if Instant::now() < until && retryable(&err) => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

fn retryable(err: &ClientError) -> bool {
    matches!(
        err,
        ClientError::DaemonNotRunning { .. }
            | ClientError::NoToken { .. }
            | ClientError::Closed { .. }
            | ClientError::AuthRefused {
                code: ErrorCode::BadToken | ErrorCode::ShuttingDown,
                ..
            }
    ) || matches!(
        err,
        ClientError::TokenFile(TokenFileError::Malformed { .. })
    )
}

type Reply = Result<ServerMessage, ClientError>;

struct Pending {
    id: u64,
    reply: oneshot::Sender<Reply>,
}

#[derive(Default)]
struct State {
    pending: VecDeque<Pending>,
    subscribers: HashMap<String, Vec<mpsc::UnboundedSender<Result<Event, ClientError>>>>,
    closed: Option<Option<CloseReason>>,
    fatal: Option<DaemonError>,
}

impl State {
    /// Why requests fail once the connection is closed: the daemon's fatal
    /// error, or its `Closing` reason, or `None` if the socket just ended.
    fn closed_error(&self) -> ClientError {
        match (&self.fatal, self.closed) {
            (Some(fatal), _) => ClientError::Daemon(fatal.clone()),
            (None, Some(reason)) => ClientError::Closed { reason },
            (None, None) => ClientError::Closed { reason: None },
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

struct Command {
    body: RequestBody,
    reply: oneshot::Sender<Reply>,
    /// For Subscribe: registered before the request is written, so no event
    /// that follows the Ack can be missed.
    subscribe: Option<mpsc::UnboundedSender<Result<Event, ClientError>>>,
}

/// A connected, authenticated client. Cheap to clone; all clones share the
/// connection. The connection closes when the last clone (and the last
/// [`Subscription`]) is dropped.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    state: Arc<Mutex<State>>,
    welcome: Arc<Welcome>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("welcome", &self.welcome)
            .finish_non_exhaustive()
    }
}

/// Connects to `socket`, mapping the OS error to what a user would do.
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

/// Refuses a peer whose uid is not ours (before any token byte is sent).
pub fn check_peer(stream: &UnixStream, socket: &Path) -> Result<(), ClientError> {
    check_peer_uid(stream, socket, current_uid())
}

/// Refuses a peer whose uid is not `expected` (before any token byte is sent).
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

/// Sends the handshake on `stream` and waits for `Welcome`. The token's
/// copy in the frame is zeroized when this returns.
pub async fn handshake(
    stream: &mut UnixStream,
    token: &SessionToken,
    timeout: Duration,
) -> Result<Welcome, ClientError> {
    let frame = encode_handshake(token);
    let io = async {
        stream
            .write_all(&frame[..])
            .await
            .map_err(|_| ClientError::Closed { reason: None })?;
        drop(frame);
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
        match decode_server_message(&payload).map_err(FrameError::from)? {
            ServerMessage::Welcome {
                protocol_version,
                daemon_version,
                connection_id,
                max_frame_len,
            } => Ok(Welcome {
                protocol_version,
                daemon_version,
                connection_id,
                max_frame_len,
            }),
            ServerMessage::Error { code, message, .. } => {
                Err(ClientError::AuthRefused { code, message })
            }
            other => Err(ClientError::Protocol(format!(
                "expected Welcome, got {other:?}"
            ))),
        }
    };
    tokio::time::timeout(timeout, io)
        .await
        .map_err(|_| ClientError::Timeout { what: "Welcome" })?
}

impl Client {
    /// Connects using the environment and defaults ([`ConnectOptions::new`]).
    pub async fn connect() -> Result<Self, ClientError> {
        ConnectOptions::new().connect().await
    }

    /// Connects to an explicit socket with an explicit token.
    pub async fn connect_to(
        socket: &Path,
        token: &SessionToken,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let stream = connect_socket(socket).await?;
        check_peer(&stream, socket)?;
        Self::from_stream(stream, token, timeout).await
    }

    /// Authenticates on an already-connected stream whose peer was checked.
    pub async fn from_stream(
        mut stream: UnixStream,
        token: &SessionToken,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let welcome = handshake(&mut stream, token, timeout).await?;
        let max_frame_len = welcome.max_frame_len as usize;
        let (read, write) = stream.into_split();
        let state = Arc::new(Mutex::new(State::default()));
        let (commands, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(write, rx, Arc::clone(&state), max_frame_len));
        tokio::spawn(read_loop(
            FramedRead::new(read, FrameCodec::new(MAX_FRAME_LEN)),
            Arc::clone(&state),
        ));
        Ok(Self {
            commands,
            state,
            welcome: Arc::new(welcome),
        })
    }

    /// What the daemon said in `Welcome`.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    async fn request(
        &self,
        body: RequestBody,
        subscribe: Option<mpsc::UnboundedSender<Result<Event, ClientError>>>,
    ) -> Reply {
        let (reply, rx) = oneshot::channel();
        if self
            .commands
            .send(Command {
                body,
                reply,
                subscribe,
            })
            .is_err()
        {
            return Err(self.closed_error());
        }
        rx.await.unwrap_or_else(|_| Err(self.closed_error()))
    }

    fn closed_error(&self) -> ClientError {
        lock(&self.state).closed_error()
    }

    async fn expect_ack(&self, body: RequestBody) -> Result<(), ClientError> {
        self.expect_ack_with(body, None).await
    }

    /// Round trip with `Ping`/`Pong`.
    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.request(RequestBody::Ping, None).await? {
            ServerMessage::Pong { .. } => Ok(()),
            other => Err(ClientError::Protocol(format!(
                "expected Pong, got {other:?}"
            ))),
        }
    }

    /// The daemon's figures.
    pub async fn status(&self) -> Result<Status, ClientError> {
        match self.request(RequestBody::Status, None).await? {
            ServerMessage::StatusReport { status, .. } => Ok(status),
            other => Err(ClientError::Protocol(format!(
                "expected StatusReport, got {other:?}"
            ))),
        }
    }

    /// Publishes; returns once the event is queued for every current subscriber.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), ClientError> {
        self.expect_ack(RequestBody::Publish {
            topic: topic.to_owned(),
            payload: payload.into(),
        })
        .await
    }

    /// Subscribes to `topic`; events arrive on the returned stream.
    pub async fn subscribe(&self, topic: &str) -> Result<Subscription, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.expect_ack_with(
            RequestBody::Subscribe {
                topic: topic.to_owned(),
            },
            Some(tx),
        )
        .await?;
        Ok(Subscription {
            events: rx,
            _client: self.clone(),
        })
    }

    async fn expect_ack_with(
        &self,
        body: RequestBody,
        subscribe: Option<mpsc::UnboundedSender<Result<Event, ClientError>>>,
    ) -> Result<(), ClientError> {
        match self.request(body, subscribe).await? {
            ServerMessage::Ack { .. } => Ok(()),
            other => Err(ClientError::Protocol(format!(
                "expected Ack, got {other:?}"
            ))),
        }
    }

    /// Unsubscribes from `topic`; every [`Subscription`] to it on this
    /// client ends.
    pub async fn unsubscribe(&self, topic: &str) -> Result<(), ClientError> {
        self.expect_ack(RequestBody::Unsubscribe {
            topic: topic.to_owned(),
        })
        .await?;
        lock(&self.state).subscribers.remove(topic);
        Ok(())
    }

    /// Asks the daemon to shut down (allowed to the daemon's own uid).
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.expect_ack(RequestBody::Shutdown).await
    }
}

/// Events of one subscription, in order; ends with an error item if the
/// daemon closes the connection (`Closed{SlowConsumer}`, say).
#[derive(Debug)]
pub struct Subscription {
    events: mpsc::UnboundedReceiver<Result<Event, ClientError>>,
    _client: Client,
}

impl Subscription {
    /// The next event; `None` once the subscription has ended.
    pub async fn next_event(&mut self) -> Option<Result<Event, ClientError>> {
        self.events.recv().await
    }
}

impl Stream for Subscription {
    type Item = Result<Event, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Command>,
    state: Arc<Mutex<State>>,
    max_frame_len: usize,
) {
    let mut next_id: u64 = 1;
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut command = Some(first);
        while let Some(Command {
            body,
            reply,
            subscribe,
        }) = command.take()
        {
            let id = next_id;
            next_id += 1;
            let start = buf.len();
            let request = Request { id, body };
            if let Err(err) = encode_message(&request, &mut buf, max_frame_len) {
                let _ = reply.send(Err(err.into()));
            } else {
                let mut st = lock(&state);
                if st.closed.is_some() {
                    buf.truncate(start);
                    // Keep the daemon's reason (Closing{Shutdown}, say).
                    let error = st.closed_error();
                    drop(st);
                    let _ = reply.send(Err(error));
                } else {
                    if let (Some(tx), RequestBody::Subscribe { topic }) = (subscribe, request.body)
                    {
                        st.subscribers.entry(topic).or_default().push(tx);
                    }
                    st.pending.push_back(Pending { id, reply });
                }
            }
            if buf.len() < WRITE_BATCH_BYTES {
                command = rx.try_recv().ok();
            }
        }
        if write.write_all(&buf).await.is_err() {
            break;
        }
        buf.clear();
        if buf.capacity() > WRITE_BATCH_BYTES * 4 {
            buf = BytesMut::new();
        }
    }
    let _ = write.shutdown().await;
}

async fn read_loop(
    mut frames: FramedRead<tokio::net::unix::OwnedReadHalf, FrameCodec>,
    state: Arc<Mutex<State>>,
) {
    let mut reason = None;
    let mut fatal = None;
    while let Some(frame) = frames.next().await {
        let Ok(frame) = frame else { break };
        // A daemon that sends an undecodable frame has broken the protocol:
        // the connection ends and every waiter gets the close error.
        let Ok(msg) = decode_server_message(&frame) else {
            break;
        };
        let reply_id = match &msg {
            ServerMessage::Pong { id }
            | ServerMessage::Ack { id }
            | ServerMessage::StatusReport { id, .. } => Some(*id),
            ServerMessage::Error { id: Some(id), .. } => Some(*id),
            _ => None,
        };
        if let Some(id) = reply_id {
            let pending = lock(&state).pending.pop_front();
            match pending {
                Some(p) if p.id == id => {
                    let result = match msg {
                        ServerMessage::Error { id, code, message } => {
                            Err(ClientError::Daemon(DaemonError { id, code, message }))
                        }
                        other => Ok(other),
                    };
                    let _ = p.reply.send(result);
                }
                Some(p) => {
                    let _ = p.reply.send(Err(ClientError::Protocol(format!(
                        "reply for id {id}, expected {}",
                        p.id
                    ))));
                    break;
                }
                None => break,
            }
            continue;
        }
        match msg {
            ServerMessage::Event {
                topic,
                sequence,
                payload,
            } => {
                let mut st = lock(&state);
                if let Some(subs) = st.subscribers.get_mut(&topic) {
                    let event = Event {
                        topic,
                        sequence,
                        payload,
                    };
                    subs.retain(|tx| tx.send(Ok(event.clone())).is_ok());
                }
            }
            ServerMessage::Closing { reason: r } => {
                reason = Some(r);
                break;
            }
            ServerMessage::Error {
                id: None,
                code,
                message,
            } => {
                fatal = Some(DaemonError {
                    id: None,
                    code,
                    message,
                });
                break;
            }
            _ => break,
        }
    }
    let mut st = lock(&state);
    st.closed = Some(reason);
    st.fatal = fatal.clone();
    let pending = std::mem::take(&mut st.pending);
    let subscribers = std::mem::take(&mut st.subscribers);
    drop(st);
    let error = || match &fatal {
        Some(f) => ClientError::Daemon(f.clone()),
        None => ClientError::Closed { reason },
    };
    for p in pending {
        let _ = p.reply.send(Err(error()));
    }
    for tx in subscribers.into_values().flatten() {
        let _ = tx.send(Err(error()));
    }
}
