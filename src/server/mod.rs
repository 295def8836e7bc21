//! The server: accepts connections and runs each through the pre-auth path
//! and then the session of the [`Service`] it serves, until shutdown.
//!
//! - `admission`: the total connection cap and the pending slots.
//! - `preauth`: everything an unauthenticated peer's bytes reach.
//! - `session`: an authenticated connection's loop.
//! - `socket`: the daemon's sockets, registered with the event loop for
//!   input only (writes go straight out; output readiness is watched only
//!   while a write waits for room).
//! - `nursery`: young connections, run by the accept task itself until
//!   they have lived a little (a command's connection never needs a task).
//! - `outbox` / `connection`: the bounded event queue of each
//!   authenticated connection, and [`Connection`], the handle services push
//!   through.
//!
//! Shutdown, as in mini-redis, is just a future passed to [`Server::run`]
//! (or a `Shutdown` request, or [`ServerHandle::shutdown`]): the service is
//! told ([`Service::shutdown`]), then every connection through a
//! [`CancellationToken`]; authenticated ones drain what is queued for them
//! and get `Closing{Shutdown}`, pending ones get `Error ShuttingDown`, and
//! `run` returns when every connection task has finished (or after a bound).
//!
//! ```no_run
//! # use keyhole::service::{Call, Connection, Interface, Service};
//! # struct Echo;
//! # impl Interface for Echo {
//! #     const NAME: &'static str = "echo";
//! #     const VERSION: u32 = 1;
//! #     type Request = String;
//! #     type Reply = String;
//! #     type Event = String;
//! # }
//! # struct EchoService;
//! # impl Service for EchoService {
//! #     type Interface = Echo;
//! #     type Error = std::convert::Infallible;
//! #     type Session = ();
//! #     fn open(&self, _: &Connection<Echo>) {}
//! #     async fn call(&self, _: Call<'_, Self>, r: String) -> Result<String, Self::Error> { Ok(r) }
//! # }
//! use std::sync::Arc;
//! use keyhole::server::{Server, ServerConfig};
//! use keyhole::token::SessionToken;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let token = Arc::new(SessionToken::generate()?);
//! let server = Server::new(EchoService, ServerConfig::default(), token);
//! let listener = tokio::net::UnixListener::bind("/run/user/1000/echo/echo.sock")?;
//! server.run(listener, async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```
//!
//! Most daemons want [`crate::daemon::serve`], which also owns the runtime
//! directory, the token file, the lock and the signals.

pub(crate) mod admission;
mod budget;
pub(crate) mod connection;
mod nursery;
mod outbox;
pub(crate) mod preauth;
pub(crate) mod session;
pub(crate) mod socket;

use std::future::{Future, poll_fn};
use std::io;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use nursery::Nursery;
use socket::{Listener, Socket};

use crate::limits::{
    ACCEPT_BACKOFF, CLOSE_FLUSH_TIMEOUT, DEFAULT_AUTH_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_FRAME_LEN, DEFAULT_MAX_PENDING, DEFAULT_MEMORY_BUDGET,
    DEFAULT_OUTBOUND_QUEUE_BYTES, DEFAULT_PENDING_GRACE, MAX_FRAME_LEN, MIN_FRAME_LEN,
    MIN_MEMORY_BUDGET,
};
use crate::service::{Interface, Service};
use crate::token::SessionToken;
use crate::token_file::current_uid;
use crate::transport::{EncodedEvent, TransportCode, Welcome, WelcomeFrame};

use self::admission::{Admission, ConnectionPermit};
use self::connection::Registry;

pub use self::connection::{Connection, LagPolicy, Peer, PushError, Pushed};

/// The server's tunables; `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Time a connection has to complete the handshake.
    pub auth_timeout: Duration,
    /// Unauthenticated connections read from at once (pending slots); more
    /// wait for a slot, unread.
    pub max_pending: usize,
    /// While connections wait for a pending slot, how long a slot holder may
    /// take to complete its handshake before it gives its slot up.
    pub pending_grace: Duration,
    /// Connections held at once.
    pub max_connections: usize,
    /// Largest frame payload after authentication (clamped to
    /// [`MIN_FRAME_LEN`]..=[`MAX_FRAME_LEN`]).
    pub max_frame_len: usize,
    /// Bytes of events that may wait for one connection (at least one frame).
    pub outbound_queue_bytes: usize,
    /// Bytes of input buffers and queued events the daemon holds over all
    /// its connections; past it, the connection holding the most is cut
    /// with `Error OverBudget` (at least 1 MiB and two frames).
    pub memory_budget: usize,
    /// Uids allowed to connect besides the daemon's own.
    pub allow_uids: Vec<u32>,
    /// Keep the process dumpable ([`crate::daemon::serve`] makes it
    /// non-dumpable otherwise, so that no process of the same uid can read
    /// the session token out of its memory). For debugging only.
    pub dumpable: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            max_pending: DEFAULT_MAX_PENDING,
            pending_grace: DEFAULT_PENDING_GRACE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            outbound_queue_bytes: DEFAULT_OUTBOUND_QUEUE_BYTES,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            allow_uids: Vec::new(),
            dumpable: false,
        }
    }
}

impl ServerConfig {
    fn normalized(mut self) -> Self {
        self.max_frame_len = self.max_frame_len.clamp(MIN_FRAME_LEN, MAX_FRAME_LEN);
        // A frame must always fit in an empty outbox.
        self.outbound_queue_bytes = self.outbound_queue_bytes.max(self.max_frame_len + 64);
        self.memory_budget = self
            .memory_budget
            .max(MIN_MEMORY_BUDGET)
            .max(2 * (self.max_frame_len + 64));
        self.max_pending = self.max_pending.max(1);
        self.max_connections = self.max_connections.max(1);
        self
    }
}

/// State shared by the accept loop, every connection and every handle;
/// independent of the service's type.
pub(crate) struct Core {
    pub(crate) config: ServerConfig,
    pub(crate) token: Arc<SessionToken>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) budget: Arc<budget::Budget>,
    pub(crate) shutdown: CancellationToken,
    /// Set just before `shutdown` is cancelled: what the hot paths check
    /// (one atomic load; `CancellationToken::is_cancelled` takes a mutex).
    stopping: AtomicBool,
    /// The accept loop, woken when `stopping` is set (a cancellation
    /// future polled at each accept took its token's lock: ~350
    /// instructions a connection).
    accept_waker: AtomicWaker,
    pub(crate) daemon_uid: u32,
    pub(crate) instance_id: u64,
    /// Every connection's `Welcome` frame but for its connection id
    /// ([`WelcomeFrame`]), encoded once.
    pub(crate) welcome: WelcomeFrame,
    started: Instant,
    next_conn_id: AtomicU64,
    /// Tells the service that shutdown began ([`Service::shutdown`]).
    on_shutdown: OnceLock<Box<dyn Fn() + Send + Sync>>,
    shutdown_begun: std::sync::Once,
    refusals: std::sync::Mutex<RefusalLog>,
}

/// Refused connections are logged at WARN, at most
/// [`REFUSALS_LOGGED_PER_WINDOW`] per [`REFUSAL_WINDOW`]; the rest are
/// counted and the count is logged when the next window opens, so a flood
/// cannot fill the log.
const REFUSALS_LOGGED_PER_WINDOW: u32 = 20;
/// See [`REFUSALS_LOGGED_PER_WINDOW`].
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

struct RefusalLog {
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl Core {
    /// Logs a refused connection (rate-limited; never a byte the peer sent).
    fn log_refusal(&self, conn: u64, peer: Peer, refused: &preauth::Refused) {
        let now = Instant::now();
        let mut log = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(log.window) >= REFUSAL_WINDOW {
            if log.suppressed > 0 {
                warn!(
                    suppressed = log.suppressed,
                    "{} more connections refused in the last {REFUSAL_WINDOW:?} (not logged one by one)",
                    log.suppressed
                );
            }
            *log = RefusalLog {
                window: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if log.logged < REFUSALS_LOGGED_PER_WINDOW {
            log.logged += 1;
            drop(log);
            warn!(
                conn,
                uid = peer.uid,
                pid = peer.pid,
                code = ?refused.code,
                "connection refused: {}",
                refused.message
            );
        } else {
            log.suppressed += 1;
        }
    }
}

impl Core {
    pub(crate) fn uid_allowed(&self, uid: u32) -> bool {
        uid == self.daemon_uid || self.config.allow_uids.contains(&uid)
    }

    /// Starts a graceful shutdown, once: the service first, then the
    /// connections.
    pub(crate) fn begin_shutdown(&self) {
        self.shutdown_begun.call_once(|| {
            if let Some(hook) = self.on_shutdown.get() {
                hook();
            }
            self.stopping.store(true, Ordering::Release);
            self.accept_waker.wake();
            self.admission.shut_down();
            self.shutdown.cancel();
            // Sessions check `is_shutting_down` whenever they wake; a
            // session registered after this sees the flag at its first check.
            self.registry.wake_all();
        });
    }

    /// Whether a graceful shutdown has begun.
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn stats(&self) -> ServerStats {
        ServerStats {
            authenticated: self.registry.len() as u64,
            pending: self.admission.pending_count() as u64,
            uptime: self.started.elapsed(),
        }
    }
}

/// A server's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections that completed the handshake and are open.
    pub authenticated: u64,
    /// Connections that have not completed the handshake yet.
    pub pending: u64,
    /// Time since the server was made.
    pub uptime: Duration,
}

/// A handle on a running server, for services and background tasks:
/// broadcast to every authenticated connection, read the figures, shut
/// down. Cheap to clone.
pub struct ServerHandle<I: Interface> {
    core: Arc<Core>,
    _interface: PhantomData<fn() -> I>,
}

impl<I: Interface> Clone for ServerHandle<I> {
    fn clone(&self) -> Self {
        Self::from_core(Arc::clone(&self.core))
    }
}

impl<I: Interface> std::fmt::Debug for ServerHandle<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("service", &I::NAME)
            .finish_non_exhaustive()
    }
}

impl<I: Interface> ServerHandle<I> {
    pub(crate) fn from_core(core: Arc<Core>) -> Self {
        Self {
            core,
            _interface: PhantomData,
        }
    }

    /// Encodes `event` once and queues it for every authenticated
    /// connection (never a pending one); returns how many it was queued for.
    pub fn broadcast(&self, event: &I::Event) -> Result<usize, crate::error::FrameError> {
        let encoded = EncodedEvent::new(event, self.core.config.max_frame_len)?;
        Ok(self.broadcast_encoded(&encoded))
    }

    /// Queues an encoded event for every authenticated connection.
    pub fn broadcast_encoded(&self, event: &EncodedEvent) -> usize {
        self.core.registry.broadcast(event)
    }

    /// The figures.
    pub fn stats(&self) -> ServerStats {
        self.core.stats()
    }

    /// The largest frame payload in force.
    pub fn max_frame_len(&self) -> usize {
        self.core.config.max_frame_len
    }

    /// Starts a graceful shutdown (what SIGTERM and `Shutdown` do).
    pub fn shutdown(&self) {
        self.core.begin_shutdown();
    }

    /// Resolves once a shutdown has begun, whatever started it.
    pub async fn shutdown_requested(&self) {
        self.core.shutdown.cancelled().await
    }

    /// Whether a shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.core.is_shutting_down()
    }
}

/// A keyhole server serving `S` to clients that present the session token.
pub struct Server<S: Service> {
    core: Arc<Core>,
    service: Arc<S>,
    tracker: TaskTracker,
}

impl<S: Service> Clone for Server<S> {
    fn clone(&self) -> Self {
        Self {
            core: Arc::clone(&self.core),
            service: Arc::clone(&self.service),
            tracker: self.tracker.clone(),
        }
    }
}

impl<S: Service> std::fmt::Debug for Server<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("service", &<S::Interface as Interface>::NAME)
            .field("config", &self.core.config)
            .finish_non_exhaustive()
    }
}

impl<S: Service> Server<S> {
    /// A server of `service` that admits clients presenting `token`.
    pub fn new(service: S, config: ServerConfig, token: Arc<SessionToken>) -> Self {
        Self::with_service(Arc::new(service), config, token)
    }

    /// [`Self::new`] with a service that is already shared (a background
    /// task may hold it too).
    pub fn with_service(service: Arc<S>, config: ServerConfig, token: Arc<SessionToken>) -> Self {
        let config = config.normalized();
        let instance_id = rand::random();
        let welcome = WelcomeFrame::new(&Welcome {
            protocol_version: crate::transport::PROTOCOL_VERSION,
            service: <S::Interface as Interface>::NAME.to_owned(),
            service_version: <S::Interface as Interface>::VERSION,
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            instance_id,
            connection_id: 0,
            max_frame_len: config.max_frame_len as u32,
        });
        let core = Arc::new(Core {
            admission: Admission::new(
                config.max_pending,
                config.max_connections,
                config.pending_grace,
                config.auth_timeout,
            ),
            registry: Arc::new(Registry::default()),
            budget: budget::Budget::new(config.memory_budget),
            config,
            token,
            shutdown: CancellationToken::new(),
            stopping: AtomicBool::new(false),
            accept_waker: AtomicWaker::new(),
            daemon_uid: current_uid(),
            instance_id,
            welcome,
            started: Instant::now(),
            next_conn_id: AtomicU64::new(1),
            on_shutdown: OnceLock::new(),
            shutdown_begun: std::sync::Once::new(),
            refusals: std::sync::Mutex::new(RefusalLog {
                window: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        });
        let hook_service = Arc::clone(&service);
        let _ = core
            .on_shutdown
            .set(Box::new(move || hook_service.shutdown()));
        Self {
            core,
            service,
            tracker: TaskTracker::new(),
        }
    }

    /// The service.
    pub fn service(&self) -> &Arc<S> {
        &self.service
    }

    /// A handle for broadcasts, figures and shutdown.
    pub fn handle(&self) -> ServerHandle<S::Interface> {
        ServerHandle::from_core(Arc::clone(&self.core))
    }

    /// This server's instance id, announced in every `Welcome`.
    pub fn instance_id(&self) -> u64 {
        self.core.instance_id
    }

    /// Serves one already-accepted stream to completion, as a connection's
    /// task does (what the fuzzers drive).
    #[cfg(feature = "fuzzing")]
    pub(crate) async fn serve_stream(&self, stream: tokio::net::UnixStream) {
        let Ok(fd) = stream.into_std().map(std::os::fd::OwnedFd::from) else {
            return;
        };
        if let Some((stream, permit, id)) = self.accepted(fd) {
            connection_task(
                Arc::clone(&self.core),
                Arc::clone(&self.service),
                stream,
                id,
                permit,
            )
            .await;
        }
    }

    /// A connection just accepted: its id (accept order, which is what
    /// "oldest" means for eviction) and its place under the connection cap.
    /// Over the cap it is refused here and now, in the accept loop, so that
    /// a storm of connections never holds more descriptors than the cap
    /// allows plus the one being refused.
    fn accepted(&self, fd: OwnedFd) -> Option<(Socket, ConnectionPermit, u64)> {
        let id = self.core.next_conn_id.fetch_add(1, Ordering::Relaxed);
        match self.core.admission.try_connection() {
            Some(permit) => match Socket::new(fd) {
                Ok(socket) => Some((socket, permit, id)),
                Err(err) => {
                    warn!(conn = id, error = %err, "cannot register an accepted connection");
                    None
                }
            },
            None => {
                let refused = match socket::peer_of(&fd) {
                    Ok(peer) if !self.core.uid_allowed(peer.uid) => preauth::Refused {
                        code: TransportCode::PeerNotAllowed,
                        message: format!("uid {} may not use this daemon", peer.uid),
                    },
                    _ => preauth::Refused {
                        code: TransportCode::TooManyConnections,
                        message: format!(
                            "connection limit of {} reached",
                            self.core.config.max_connections
                        ),
                    },
                };
                preauth::refuse(&fd, &refused);
                debug!(conn = id, code = ?refused.code, "connection refused: {}", refused.message);
                None
            }
        }
    }

    /// Accepts connections on `listener` until `shutdown` resolves or a
    /// shutdown is requested otherwise, then shuts down gracefully and
    /// returns when every connection has finished.
    pub async fn run(&self, listener: UnixListener, shutdown: impl Future<Output = ()>) {
        // The accept loop is a task of its own, so that it runs on a worker
        // thread like the connections: accepting on a thread that is not a
        // worker cost two wake-ups across threads per connection.
        let listener = match Listener::new(listener) {
            Ok(listener) => listener,
            Err(err) => {
                warn!(error = %err, "cannot register the listening socket");
                return;
            }
        };
        // Without it no deadline ends (a silent peer's handshake among them):
        // serve nothing.
        if let Err(err) = crate::timer::start() {
            error!(error = %err, "cannot start the timer thread; not serving");
            return;
        }
        let mut accepting = tokio::spawn(self.clone().accept_loop(listener));
        tokio::pin!(shutdown);
        let listener = tokio::select! {
            biased;
            _ = &mut shutdown => {
                info!("shutdown requested by signal");
                self.core.begin_shutdown();
                accepting.await
            }
            ended = &mut accepting => ended,
        };
        let listener = match listener {
            Ok(listener) => Some(listener),
            Err(err) => {
                warn!(error = %err, "the accept loop failed");
                None
            }
        };
        self.core.begin_shutdown();
        // Connections still in the backlog are told, not just dropped.
        if let Some(listener) = listener {
            while let Ok(fd) = listener.accept_now() {
                self.spawn_connection(fd);
            }
        }
        self.tracker.close();
        let bound = CLOSE_FLUSH_TIMEOUT + Duration::from_secs(1);
        if crate::timer::timeout(bound, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.tracker.len(),
                "connections still closing after {bound:?}; leaving them"
            );
        }
    }

    fn spawn_connection(&self, fd: OwnedFd) {
        if let Some(task) = self.connection(fd) {
            self.tracker.spawn(task);
        }
    }

    /// The task of a connection just accepted, unless it is refused at once.
    fn connection(
        &self,
        fd: OwnedFd,
    ) -> Option<impl Future<Output = ()> + Send + 'static + use<S>> {
        let (stream, permit, id) = self.accepted(fd)?;
        Some(connection_task(
            Arc::clone(&self.core),
            Arc::clone(&self.service),
            stream,
            id,
            permit,
        ))
    }

    /// Accepts until a shutdown begins, running young connections itself
    /// (see [`nursery`]); returns the listener so that [`Self::run`] can
    /// answer what is left in the backlog.
    async fn accept_loop(self, listener: Listener) -> Listener {
        let mut exhausted_logged = false;
        let mut backoff: Option<crate::timer::Sleep> = None;
        let mut nursery = Nursery::new(self.tracker.clone());
        let core = &self.core;
        poll_fn(|cx| {
            core.accept_waker.register(cx.waker());
            if core.is_shutting_down() {
                debug!("shutting down: accepting no more");
                nursery.release_all();
                return Poll::Ready(());
            }
            nursery.poll(cx);
            if let Some(sleep) = backoff.as_mut() {
                if sleep.poll_elapsed(cx).is_pending() {
                    return Poll::Pending;
                }
                backoff = None;
            }
            loop {
                match listener.poll_accept(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(fd)) => {
                        exhausted_logged = false;
                        if let Some(conn) = self.connection(fd) {
                            nursery.adopt(conn, cx);
                        }
                    }
                    Poll::Ready(Err(err)) if is_resource_exhaustion(&err) => {
                        // Out of descriptors or memory: keep serving existing
                        // connections, retry later, never spin.
                        if !exhausted_logged {
                            warn!(error = %err, "accept failed for lack of resources; retrying every {ACCEPT_BACKOFF:?}");
                            exhausted_logged = true;
                        }
                        let mut sleep = crate::timer::sleep(ACCEPT_BACKOFF);
                        if sleep.poll_elapsed(cx).is_pending() {
                            backoff = Some(sleep);
                            return Poll::Pending;
                        }
                    }
                    Poll::Ready(Err(err)) => warn!(error = %err, "accept failed"),
                }
            }
        })
        .await;
        listener
    }
}

/// One connection from its credentials to its close.
///
/// (A function returning an `async move` block, not an `async fn`: an
/// `async fn` keeps each argument twice in its state, and this state is
/// part of every connection's task.)
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn connection_task<S: Service>(
    core: Arc<Core>,
    service: Arc<S>,
    mut stream: Socket,
    conn_id: u64,
    permit: ConnectionPermit,
) -> impl Future<Output = ()> + Send {
    async move {
        // Held (by the block) until the connection ends.
        let _permit = &permit;
        let core = &core;
        let service = &*service;
        let peer = match stream.peer() {
            Ok(peer) => peer,
            Err(err) => {
                debug!(conn = conn_id, error = %err, "connection closed: no peer credentials");
                return;
            }
        };
        debug!(
            conn = conn_id,
            pid = peer.pid,
            uid = peer.uid,
            "connection opened"
        );
        let ahead = match preauth::admit(core, &stream, peer, conn_id).await {
            Ok(ahead) => ahead,
            Err(refused) => {
                preauth::refuse(&stream, &refused);
                if refused.code == TransportCode::ShuttingDown {
                    debug!(
                        conn = conn_id,
                        pid = peer.pid,
                        uid = peer.uid,
                        "connection refused: shutting down"
                    );
                } else {
                    core.log_refusal(conn_id, peer, &refused);
                }
                return;
            }
        };
        debug!(
            conn = conn_id,
            pid = peer.pid,
            uid = peer.uid,
            "connection authenticated"
        );
        // Boxed: the task of a pending connection is sized for the handshake
        // only, not for a session's buffers and waits.
        let end = Box::pin(session::run(
            core,
            service,
            &mut stream,
            peer,
            conn_id,
            ahead.bytes,
            ahead.drained,
        ))
        .await;
        debug!(conn = conn_id, pid = peer.pid, uid = peer.uid, reason = %end, "connection closed");
    }
}

fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
            || code == rustix::io::Errno::NOBUFS.raw_os_error()
            || code == rustix::io::Errno::NOMEM.raw_os_error()
    )
}
