//! The daemon's server: the accept loop, admission, one task per connection,
//! the hub, and graceful shutdown.
//!
//! - [`admission`]: total connection cap and pending slots with eviction.
//! - [`connection`]: one connection from peer-credential check to close.
//! - [`hub`]: topics, subscribers, bounded outboxes, fan-out.
//!
//! Shutdown, as in mini-redis, is just a future passed to [`Server::run`]
//! (or a `Shutdown` request): the hub stops taking publishes, every
//! connection is told through a [`CancellationToken`], authenticated ones
//! drain what is queued for them and get `Closing{Shutdown}`, and `run`
//! returns when every connection task has finished (or after a bound).

pub mod admission;
pub mod connection;
pub mod hub;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::limits::{
    ACCEPT_BACKOFF, CLOSE_FLUSH_TIMEOUT, DEFAULT_AUTH_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_FRAME_LEN, DEFAULT_MAX_PENDING, DEFAULT_OUTBOUND_QUEUE_BYTES, MAX_FRAME_LEN,
    MIN_FRAME_LEN,
};
use crate::message::Status;
use crate::token::SessionToken;
use crate::token_file::current_uid;

use self::admission::Admission;
use self::hub::Hub;

/// The server's tunables; `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Time a connection has to complete the handshake.
    pub auth_timeout: Duration,
    /// Unauthenticated connections held at once.
    pub max_pending: usize,
    /// Connections held at once.
    pub max_connections: usize,
    /// Largest frame payload after authentication (clamped to
    /// [`MIN_FRAME_LEN`]..=[`MAX_FRAME_LEN`]).
    pub max_frame_len: usize,
    /// Bytes of events that may wait for one subscriber (at least one frame).
    pub outbound_queue_bytes: usize,
    /// Uids allowed to connect besides the daemon's own.
    pub allow_uids: Vec<u32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            max_pending: DEFAULT_MAX_PENDING,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            outbound_queue_bytes: DEFAULT_OUTBOUND_QUEUE_BYTES,
            allow_uids: Vec::new(),
        }
    }
}

impl ServerConfig {
    fn normalized(mut self) -> Self {
        self.max_frame_len = self.max_frame_len.clamp(MIN_FRAME_LEN, MAX_FRAME_LEN);
        // A frame must always fit in an empty outbox.
        self.outbound_queue_bytes = self.outbound_queue_bytes.max(self.max_frame_len + 64);
        self.max_pending = self.max_pending.max(1);
        self.max_connections = self.max_connections.max(1);
        self
    }
}

/// State shared by the accept loop and every connection task.
pub struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) token: SessionToken,
    pub(crate) hub: Hub,
    pub(crate) admission: Arc<Admission>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) daemon_uid: u32,
    started: Instant,
    next_conn_id: AtomicU64,
    pub(crate) authenticated: AtomicU64,
}

impl Shared {
    pub(crate) fn uid_allowed(&self, uid: u32) -> bool {
        uid == self.daemon_uid || self.config.allow_uids.contains(&uid)
    }

    pub(crate) fn status(&self) -> Status {
        let (topics, subscribers) = self.hub.counts();
        Status {
            authenticated: self.authenticated.load(Ordering::Acquire),
            pending: self.admission.pending_count() as u64,
            topics,
            subscribers,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// Starts a graceful shutdown: publishes stop first, then connections
    /// are told, so every Ack'ed publish is in an outbox that gets drained.
    pub(crate) fn begin_shutdown(&self) {
        self.hub.close();
        self.shutdown.cancel();
    }
}

/// A keyhole server: holds the session token and serves connections.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server that admits clients presenting `token`.
    pub fn new(config: ServerConfig, token: SessionToken) -> Self {
        let config = config.normalized();
        Self {
            shared: Arc::new(Shared {
                hub: Hub::new(config.max_frame_len),
                admission: Admission::new(config.max_pending, config.max_connections),
                config,
                token,
                shutdown: CancellationToken::new(),
                daemon_uid: current_uid(),
                started: Instant::now(),
                next_conn_id: AtomicU64::new(1),
                authenticated: AtomicU64::new(0),
            }),
            tracker: TaskTracker::new(),
        }
    }

    /// The figures a `Status` request reports.
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// Starts a graceful shutdown (what SIGTERM and `Shutdown` do).
    pub fn shutdown(&self) {
        self.shared.begin_shutdown();
    }

    /// Resolves once a shutdown has begun, whatever started it.
    pub async fn shutdown_requested(&self) {
        self.shared.shutdown.cancelled().await
    }

    /// Serves one already-accepted stream to completion (the accept loop's
    /// per-connection task; also what the fuzzers and tests drive directly).
    pub async fn serve_stream(&self, stream: UnixStream) {
        let id = self.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        connection::run(Arc::clone(&self.shared), stream, id).await;
    }

    /// Accepts connections on `listener` until `shutdown` resolves or a
    /// `Shutdown` request arrives, then shuts down gracefully and returns
    /// when every connection has finished.
    pub async fn run(&self, listener: UnixListener, shutdown: impl Future<Output = ()>) {
        // The accept loop is a task of its own, so that it runs on a worker
        // thread like the connections: the caller (keyholed's `block_on`)
        // is not a worker, and accepting there cost two wake-ups across
        // threads per connection (the listener's readiness, then the new
        // task handed to a worker).
        let stop = CancellationToken::new();
        let mut accepting = tokio::spawn(self.clone().accept_loop(listener, stop.clone()));
        tokio::pin!(shutdown);
        let listener = tokio::select! {
            biased;
            _ = &mut shutdown => {
                info!("shutdown requested by signal");
                stop.cancel();
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
        self.shared.begin_shutdown();
        // Connections still in the backlog are told, not just dropped.
        if let Some(listener) = listener {
            while let Some(Ok((stream, _))) = listener.accept().now_or_never() {
                let server = self.clone();
                self.tracker
                    .spawn(async move { server.serve_stream(stream).await });
            }
        }
        self.tracker.close();
        let bound = CLOSE_FLUSH_TIMEOUT + Duration::from_secs(1);
        if tokio::time::timeout(bound, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.tracker.len(),
                "connections still closing after {bound:?}; leaving them"
            );
        }
    }

    /// Accepts until `stop` or a shutdown; returns the listener so that
    /// [`Self::run`] can answer what is left in the backlog.
    async fn accept_loop(self, listener: UnixListener, stop: CancellationToken) -> UnixListener {
        let mut fd_exhausted_logged = false;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = self.shared.shutdown.cancelled() => {
                    info!("shutdown requested");
                    break;
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, _addr)) => {
                        fd_exhausted_logged = false;
                        let server = self.clone();
                        self.tracker.spawn(async move { server.serve_stream(stream).await });
                    }
                    Err(err) if is_resource_exhaustion(&err) => {
                        // Out of descriptors or memory: keep serving existing
                        // connections, retry later, never spin.
                        if !fd_exhausted_logged {
                            warn!(error = %err, "accept failed for lack of resources; retrying every {ACCEPT_BACKOFF:?}");
                            fd_exhausted_logged = true;
                        }
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    Err(err) => warn!(error = %err, "accept failed"),
                },
            }
        }
        listener
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
