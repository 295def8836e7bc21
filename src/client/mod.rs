//! The async client, for any keyhole service.
//!
//! - `connect`: [`ConnectOptions`]: where the socket and the token are,
//!   the peer check, the handshake.
//! - `mux`: many requests in flight on one connection, replies matched,
//!   events bounded by a budget.
//! - [`hub`]: [`HubClient`], the hub's API on top.
//!
//! [`Client<I>`] makes typed calls to the service `I` (it refuses a daemon
//! that serves another service, naming both) and receives its events;
//! [`RawClient`] speaks only the transport (`ping`, `shutdown`), so it works
//! with any keyhole daemon.
//!
//! ```no_run
//! use keyhole::client::{Client, ConnectOptions};
//! use keyhole::hub::{Hub, HubReply, HubRequest};
//!
//! # async fn example() -> Result<(), keyhole::client::ClientError> {
//! // From the environment: $KEYHOLE_SOCKET / $KEYHOLE_DIR, the token file.
//! let client: Client<Hub> = ConnectOptions::new().connect().await?;
//! client.ping().await?;
//! match client.call(HubRequest::Status).await? {
//!     HubReply::Status(status) => println!("{} topics", status.topics),
//!     other => println!("unexpected: {other:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! Reconnecting: a daemon restart rotates the token, and [`ConnectOptions`]
//! reads it again at every connect, so the reconnect path is simply to
//! connect again; [`ConnectOptions::connect_retrying`] does that until a
//! deadline while the daemon comes back.

mod connect;
pub mod hub;
mod mux;
mod reconnect;

use std::io;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::mpsc;

use crate::encoding;
use crate::error::{DecodeError, FrameError, TokenFileError, TokenParseError};
use crate::fds::Descriptors;
use crate::service::Interface;
use crate::transport::{
    CloseReason, ErrorCode, RequestKind, TransportCode, Welcome, encode_request,
};

pub use self::connect::{
    ConnectOptions, DEFAULT_EVENT_BUDGET, DEFAULT_TIMEOUT, check_peer_uid, connect_socket,
    connect_socket_within, handshake,
};
pub use self::hub::{HubClient, Subscription};
pub use self::mux::EventPermit;
pub(crate) use self::mux::Mux;
use self::mux::{Answer, Discard, EventSink};
pub use self::reconnect::{ReconnectingHub, ReconnectingSubscription};

/// Errors of the client, by what a user would do about them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// None of `KEYHOLE_DIR`, `XDG_RUNTIME_DIR`, `HOME` is set and no explicit path was given.
    #[error("cannot locate the runtime directory: set KEYHOLE_DIR or KEYHOLE_SOCKET")]
    NoRuntimeDir,
    /// Nothing listens on the socket (missing, or a stale socket file).
    #[error("daemon not running: {socket}")]
    DaemonNotRunning {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The socket exists but we may not connect to it.
    #[error("permission denied: {socket}")]
    Permission {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The daemon's listen backlog stayed full (a connect storm) for the
    /// whole timeout.
    #[error("{socket}: the daemon is busy (its listen backlog stayed full for {waited:?})")]
    Busy {
        /// The socket path.
        socket: PathBuf,
        /// How long connecting was retried.
        waited: Duration,
    },
    /// Connecting failed otherwise.
    #[error("cannot connect to {socket}")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        #[source]
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
    #[error("the token file is refused")]
    TokenFile(#[source] TokenFileError),
    /// `KEYHOLE_DAEMON_UID` is set but is not a uid.
    #[error("KEYHOLE_DAEMON_UID is not a uid (a decimal number): {value:?}")]
    BadDaemonUid {
        /// The value found.
        value: String,
    },
    /// `KEYHOLE_TOKEN` is set but is not a token.
    #[error("KEYHOLE_TOKEN is not a token")]
    TokenEnv(#[source] TokenParseError),
    /// The socket is served by another uid: the token was not sent.
    #[error("{socket} is served by uid {got}, not uid {expected}; refusing to send the token")]
    PeerUidMismatch {
        /// The socket path.
        socket: PathBuf,
        /// The uid expected.
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
    /// The daemon serves another service than the one asked for.
    #[error(
        "{socket} serves the {found} service (version {found_version}), not {expected} (version {expected_version})"
    )]
    WrongService {
        /// The socket path.
        socket: PathBuf,
        /// The service this client speaks.
        expected: &'static str,
        /// Its version.
        expected_version: u32,
        /// The service the daemon announced.
        found: String,
        /// Its version.
        found_version: u32,
    },
    /// No answer in time.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
    },
    /// The daemon answered with a transport error (with the request's id),
    /// or closed the connection with one (id absent).
    #[error("the daemon refused the request ({code:?}): {message}")]
    Daemon {
        /// The request it answers, if any.
        id: Option<u64>,
        /// The code.
        code: TransportCode,
        /// The daemon's text.
        message: String,
    },
    /// The service answered the request with one of its own errors.
    #[error("the service refused the request (code {code}): {message}")]
    Service {
        /// The service's own code (the wire code minus 1000).
        code: u32,
        /// The service's text.
        message: String,
    },
    /// The connection is closed: `Closing{reason}` from the daemon, or the
    /// socket ended (`None`).
    #[error("connection closed{}", match reason { Some(r) => format!(" by the daemon: {r:?}"), None => String::new() })]
    Closed {
        /// The daemon's reason, if it sent one.
        reason: Option<CloseReason>,
    },
    /// The socket ended without a reason while this client had stopped
    /// reading because the application left its event budget full (see
    /// [`ConnectOptions::event_budget`]): the daemon most likely cut it as a
    /// slow consumer, and its `Closing` could not get through a socket the
    /// client was not reading. The events received before are delivered.
    #[error(
        "connection closed after this client fell behind: the application left its event budget ({budget} bytes) full, so the client stopped reading and the daemon most likely cut it as a slow consumer"
    )]
    FellBehind {
        /// The event budget in bytes.
        budget: usize,
    },
    /// The daemon dropped this many events of a subscription that falls
    /// behind (it asked for that: the lag policy "drop oldest"); the
    /// subscription goes on with the events after them.
    #[error("{missed} events were dropped: this subscriber fell behind")]
    Lagged {
        /// Events dropped.
        missed: u64,
    },
    /// A reconnecting subscription lost its connection and subscribed again
    /// on a new one: events published meanwhile were missed (and with
    /// `restarted`, the daemon restarted, so numbering starts again).
    #[error("reconnected{}: events published meanwhile were missed", if *restarted { " to a restarted daemon" } else { "" })]
    Reconnected {
        /// Whether the daemon restarted.
        restarted: bool,
    },
    /// The daemon sent something the protocol does not allow here.
    #[error("protocol violation by the daemon: {0}")]
    Protocol(String),
    /// A request could not be framed (over the frame limit, say).
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl ClientError {
    /// The daemon's error code, when the daemon sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::AuthRefused { code, .. } => Some(*code),
            ClientError::Daemon { code, .. } => Some(ErrorCode::Transport(*code)),
            ClientError::Service { code, .. } => Some(ErrorCode::Service(*code)),
            _ => None,
        }
    }

    pub(crate) fn protocol(err: DecodeError) -> Self {
        ClientError::Protocol(format!("undecodable frame from the daemon: {err}"))
    }

    /// Whether connecting again may succeed (the daemon is starting, or
    /// restarting with a new token).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::DaemonNotRunning { .. }
                | ClientError::NoToken { .. }
                | ClientError::Closed { .. }
                | ClientError::FellBehind { .. }
                | ClientError::Busy { .. }
                | ClientError::AuthRefused {
                    code: ErrorCode::Transport(
                        TransportCode::BadToken
                            | TransportCode::ShuttingDown
                            | TransportCode::AuthTimeout
                            | TransportCode::TooManyUnauthenticated
                            | TransportCode::TooManyConnections
                    ),
                    ..
                }
                | ClientError::TokenFile(TokenFileError::Malformed { .. })
        )
    }
}

/// A connection that speaks only the transport: works with any keyhole
/// daemon, whatever its service. Events are discarded. Cheap to clone; the
/// connection closes when the last clone is dropped.
///
/// Connecting returns once the socket is connected and the peer checked:
/// the handshake goes out with the first requests, in one write, and a
/// refused handshake is reported by every request as the handshake's error
/// ([`ClientError::AuthRefused`]). [`RawClient::welcome`] waits for it.
#[derive(Clone)]
pub struct RawClient {
    mux: Arc<Mux>,
    socket: Arc<PathBuf>,
    timeout: Duration,
}

impl std::fmt::Debug for RawClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawClient")
            .field("socket", &self.socket)
            .field("welcome", &self.mux.welcome_now())
            .finish_non_exhaustive()
    }
}

impl ConnectOptions {
    /// Connects to whatever service the daemon serves (transport only).
    pub async fn connect_raw(&self) -> Result<RawClient, ClientError> {
        self.connect_with_sink(Arc::new(Discard), None).await
    }

    /// Connects to a daemon serving `I`; a daemon serving anything else is
    /// refused with [`ClientError::WrongService`] (reported by the first
    /// request, or by [`Client::welcome`]): the handshake carries an
    /// `Expect` naming `I`, so no request of this client ever reaches
    /// another service.
    pub async fn connect<I: Interface>(&self) -> Result<Client<I>, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Arc::new(Queue::<I::Event> {
            tx: Mutex::new(Some(tx)),
        });
        let raw = self
            .connect_with_sink(sink, Some((I::NAME, I::VERSION)))
            .await?;
        Ok(Client {
            raw,
            events: Arc::new(Mutex::new(Some(EventStream { rx }))),
            _interface: PhantomData,
        })
    }

    /// [`Self::connect`] again and again until `deadline` passes, while the
    /// daemon is not (yet) there or its token is being rotated; returns once
    /// `Welcome` is in. The documented reconnect path after a daemon
    /// restart.
    pub async fn connect_retrying<I: Interface>(
        &self,
        deadline: Duration,
    ) -> Result<Client<I>, ClientError> {
        let until = Instant::now() + deadline;
        loop {
            let attempt = async {
                let client = self.connect::<I>().await?;
                client.welcome().await?;
                Ok::<_, ClientError>(client)
            };
            match attempt.await {
                Ok(client) => return Ok(client),
                Err(err) if Instant::now() < until && err.is_retryable() => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    pub(crate) async fn connect_with_sink(
        &self,
        sink: Arc<dyn EventSink>,
        expect: Option<(&'static str, u32)>,
    ) -> Result<RawClient, ClientError> {
        let startup = self.startup(expect).await?;
        let socket = Arc::new(startup.socket.clone());
        let mux = Mux::start(startup, self.event_budget_or_default(), sink);
        Ok(RawClient {
            mux: Arc::new(mux),
            socket,
            timeout: self.timeout_or_default(),
        })
    }
}

impl RawClient {
    /// What the daemon said in `Welcome`, waiting for it if it has not
    /// arrived yet (at most the connect timeout); the handshake's error if
    /// the daemon refused it.
    pub async fn welcome(&self) -> Result<Arc<Welcome>, ClientError> {
        self.mux.welcome().await
    }

    /// The socket path connected to.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Round trip with `Ping`/`Ack` (a health check of any keyhole daemon).
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.transport(RequestKind::Ping, "the reply to Ping").await
    }

    /// Asks the daemon to shut down (allowed to the daemon's own uid).
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.transport(RequestKind::Shutdown, "the reply to Shutdown")
            .await
    }

    async fn transport(&self, kind: RequestKind, what: &'static str) -> Result<(), ClientError> {
        let rx = self.mux.send(kind, |dst, max| {
            encode_request::<()>(dst, 0, kind, None, max)
        })?;
        match self.wait(rx, self.timeout, what).await? {
            Answer::Ack => Ok(()),
            Answer::Reply(_) | Answer::ReplyFds(..) => {
                Err(ClientError::Protocol(format!("a Reply to {kind:?}")))
            }
        }
    }

    /// Opts this connection in to file descriptors (`AcceptFds`, section
    /// 19 of proto-spec.md): from then on the daemon may send it events
    /// and replies carrying descriptors, and requests may carry them
    /// ([`Self::call_raw_fds`]). Waits for the daemon's `Ack`.
    pub async fn accept_fds(&self) -> Result<(), ClientError> {
        if self.mux.fds_accepted() {
            return Ok(());
        }
        let rx = self.mux.accept_fds()?;
        match self
            .wait(rx, self.timeout, "the reply to AcceptFds")
            .await?
        {
            Answer::Ack => Ok(()),
            _ => Err(ClientError::Protocol("a Reply to AcceptFds".into())),
        }
    }

    /// Sends a service request carrying `fds` (a `CallFds`; at most
    /// [`crate::limits::MAX_FDS_PER_FRAME`]) and waits for its reply body
    /// and the descriptors that came with it. Sends `AcceptFds` first if
    /// this connection has not.
    pub async fn call_raw_fds<R: serde::Serialize>(
        &self,
        request: &R,
        fds: Descriptors,
        timeout: Duration,
    ) -> Result<(Bytes, Vec<OwnedFd>), ClientError> {
        if fds.is_empty() || fds.len() > crate::limits::MAX_FDS_PER_FRAME {
            return Err(ClientError::Protocol(format!(
                "a request carries 1 to {} descriptors, not {}",
                crate::limits::MAX_FDS_PER_FRAME,
                fds.len()
            )));
        }
        self.accept_fds().await?;
        let count = fds.len() as u32;
        let rx = self.mux.send_with_fds(
            |dst, max| crate::transport::encode_call_fds(dst, 0, count, request, max),
            fds,
        )?;
        match self.wait(rx, timeout, "the reply").await? {
            Answer::Reply(body) => Ok((body, Vec::new())),
            Answer::ReplyFds(body, fds) => Ok((body, fds)),
            Answer::Ack => Err(ClientError::Protocol("an Ack to a CallFds".into())),
        }
    }

    /// Sends a service request (already typed) and waits for its reply body.
    async fn call_raw<R: serde::Serialize>(
        &self,
        request: &R,
        timeout: Duration,
    ) -> Result<Bytes, ClientError> {
        self.call_raw_with(request, timeout, |_| {}).await
    }

    /// [`Self::call_raw`], telling `on_id` the request's id before it is
    /// sent.
    pub(crate) async fn call_raw_with<R: serde::Serialize>(
        &self,
        request: &R,
        timeout: Duration,
        on_id: impl FnOnce(u64),
    ) -> Result<Bytes, ClientError> {
        let rx = self
            .mux
            .send_when_ready(
                RequestKind::Call,
                |dst, max| encode_request(dst, 0, RequestKind::Call, Some(request), max),
                on_id,
            )
            .await?;
        match self.wait(rx, timeout, "the reply").await? {
            // (Descriptors sent with the reply of a plain call are closed.)
            Answer::Reply(body) | Answer::ReplyFds(body, _) => Ok(body),
            Answer::Ack => Err(ClientError::Protocol("an Ack to a Call".into())),
        }
    }

    /// The connection's sender, without keeping the connection open.
    pub(crate) fn downgrade(&self) -> std::sync::Weak<Mux> {
        Arc::downgrade(&self.mux)
    }

    /// Why requests fail now that the connection is over.
    pub(crate) fn ended(&self) -> ClientError {
        self.mux.ended_error()
    }

    /// The timeout calls wait for by default.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn wait(
        &self,
        rx: tokio::sync::oneshot::Receiver<Result<Answer, ClientError>>,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Answer, ClientError> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(self.mux.ended_error()),
            // A request sent with the handshake that the daemon never
            // answered: what it did not answer is the handshake.
            Err(_) if self.mux.welcome_now().is_none() => Err(ClientError::Timeout {
                what: "the daemon's answer to the handshake",
            }),
            Err(_) => Err(ClientError::Timeout { what }),
        }
    }
}

/// A client of the service `I`: typed calls and events. Cheap to clone;
/// all clones share the connection, which closes when the last clone is
/// dropped.
pub struct Client<I: Interface> {
    raw: RawClient,
    events: Arc<Mutex<Option<EventStream<I::Event>>>>,
    _interface: PhantomData<fn() -> I>,
}

impl<I: Interface> Clone for Client<I> {
    fn clone(&self) -> Self {
        Self {
            raw: self.raw.clone(),
            events: Arc::clone(&self.events),
            _interface: PhantomData,
        }
    }
}

impl<I: Interface> std::fmt::Debug for Client<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("service", &I::NAME)
            .field("raw", &self.raw)
            .finish_non_exhaustive()
    }
}

impl<I: Interface> Client<I> {
    /// Connects from the environment and defaults.
    pub async fn connect() -> Result<Self, ClientError> {
        ConnectOptions::new().connect().await
    }

    /// Sends `request` and waits for its reply (at most the connect
    /// options' timeout). A service error is [`ClientError::Service`].
    pub async fn call(&self, request: I::Request) -> Result<I::Reply, ClientError> {
        self.call_timeout(request, self.raw.timeout).await
    }

    /// [`Self::call`] with its own timeout. When it passes, the reply (if
    /// one comes later) is discarded; the connection stays usable.
    pub async fn call_timeout(
        &self,
        request: I::Request,
        timeout: Duration,
    ) -> Result<I::Reply, ClientError> {
        let body = self.raw.call_raw(&request, timeout).await?;
        encoding::decode_shared(&body).map_err(|err| {
            ClientError::Protocol(format!("a reply that is not a reply of {}: {err}", I::NAME))
        })
    }

    /// [`Self::call`] carrying descriptors (see [`RawClient::call_raw_fds`]):
    /// the reply and the descriptors that came with it.
    pub async fn call_with_fds(
        &self,
        request: I::Request,
        fds: Vec<OwnedFd>,
    ) -> Result<(I::Reply, Vec<OwnedFd>), ClientError> {
        let (body, fds) = self
            .raw
            .call_raw_fds(&request, Descriptors::new(fds), self.raw.timeout)
            .await?;
        let reply = encoding::decode_shared(&body).map_err(|err| {
            ClientError::Protocol(format!("a reply that is not a reply of {}: {err}", I::NAME))
        })?;
        Ok((reply, fds))
    }

    /// Opts in to file descriptors (see [`RawClient::accept_fds`]): events
    /// carrying them arrive as [`Delivery::EventFds`].
    pub async fn accept_fds(&self) -> Result<(), ClientError> {
        self.raw.accept_fds().await
    }

    /// The events the daemon pushes to this connection, in order. Can be
    /// taken once; until it is, events are kept (within the event budget).
    /// Dropping the stream discards later events.
    pub fn events(&self) -> Option<EventStream<I::Event>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Round trip with `Ping`/`Ack`.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.raw.ping().await
    }

    /// Asks the daemon to shut down (allowed to the daemon's own uid).
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.raw.shutdown().await
    }

    /// What the daemon said in `Welcome` (see [`RawClient::welcome`]).
    pub async fn welcome(&self) -> Result<Arc<Welcome>, ClientError> {
        self.raw.welcome().await
    }

    /// The transport-level client.
    pub fn raw(&self) -> &RawClient {
        &self.raw
    }
}

/// One item of a [`Client`]'s events.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery<E> {
    /// An event of `stream` (the service's numbering of this connection's
    /// event streams; 0: not part of one).
    Event {
        /// The stream.
        stream: u64,
        /// The event.
        event: E,
    },
    /// An event that came with descriptors (an `EventFds`, after
    /// [`Client::accept_fds`]).
    EventFds {
        /// The stream.
        stream: u64,
        /// The event.
        event: E,
        /// Its descriptors (received close-on-exec).
        fds: Descriptors,
    },
    /// The daemon dropped `missed` events of `stream` from this
    /// connection's full queue (the stream's lag policy); the stream's
    /// events after this item follow on from there.
    Lagged {
        /// The stream.
        stream: u64,
        /// Events dropped.
        missed: u64,
    },
}

/// One item of an event queue: the delivery and its share of the budget,
/// or why the connection ended.
type EventItem<E> = Result<(Delivery<E>, EventPermit), ClientError>;

/// Events of a [`Client`], in order; ends with an error item when the
/// connection ends (`Closed{SlowConsumer}`, say), then `None`.
pub struct EventStream<E> {
    rx: mpsc::UnboundedReceiver<EventItem<E>>,
}

impl<E> std::fmt::Debug for EventStream<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl<E> EventStream<E> {
    /// The next event or lag notice; `None` once the stream has ended.
    pub async fn next_event(&mut self) -> Option<Result<Delivery<E>, ClientError>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Delivery<E>, ClientError>>> {
        // The event's budget is given back as it is handed over.
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(|(event, _permit)| event)))
    }
}

impl<E> Stream for EventStream<E> {
    type Item = Result<Delivery<E>, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_event(cx)
    }
}

impl<E> Unpin for EventStream<E> {}

/// The sink of a [`Client`]: one queue, until the stream is dropped.
struct Queue<E> {
    tx: Mutex<Option<mpsc::UnboundedSender<EventItem<E>>>>,
}

impl<E> Queue<E> {
    fn send(&self, item: (Delivery<E>, EventPermit)) {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = tx.as_ref() {
            if sender.send(Ok(item)).is_err() {
                *tx = None;
            }
        }
    }
}

impl<E: serde::de::DeserializeOwned + Send + 'static> EventSink for Queue<E> {
    fn deliver(
        &self,
        stream: u64,
        body: Bytes,
        fds: Vec<OwnedFd>,
        permit: EventPermit,
    ) -> Result<(), DecodeError> {
        let event = encoding::decode_shared::<E>(&body)?;
        let delivery = if fds.is_empty() {
            Delivery::Event { stream, event }
        } else {
            Delivery::EventFds {
                stream,
                event,
                fds: Descriptors::new(fds),
            }
        };
        self.send((delivery, permit));
        Ok(())
    }

    fn lagged(&self, stream: u64, missed: u64) {
        self.send((Delivery::Lagged { stream, missed }, EventPermit::none()));
    }

    fn end(&self, error: &dyn Fn() -> ClientError) {
        if let Some(sender) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = sender.send(Err(error()));
        }
    }
}
