//! The service API: how a daemon author's own messages are served behind
//! keyhole's authenticated socket.
//!
//! Two traits:
//!
//! - [`Interface`] names a service and its message types (request, reply,
//!   event). Client and daemon share it: the daemon announces
//!   [`Interface::NAME`] and [`Interface::VERSION`] in `Welcome`, and a
//!   [`crate::client::Client`] for another service refuses to go on.
//! - [`Service`] is the daemon's side: one `call` per request (it may
//!   await; other connections are not held up), per-connection state
//!   ([`Service::Session`]), and hooks for connect, disconnect and shutdown.
//!
//! Everything else is the framework's and not the service's to get wrong:
//! the peer-uid check before the first read, pid-fair admission, the
//! deadline-bound handshake, frame limits checked before allocation,
//! replies in request order, bounded outboxes with the slow-consumer cut,
//! and graceful shutdown with drain.
//!
//! ```
//! use keyhole::service::{Call, Connection, Interface, Service, ServiceError};
//! use serde::{Deserialize, Serialize};
//!
//! /// What client and daemon agree on.
//! struct Echo;
//! impl Interface for Echo {
//!     const NAME: &'static str = "echo";
//!     const VERSION: u32 = 1;
//!     type Request = String;
//!     type Reply = String;
//!     type Event = String;
//! }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("empty request")]
//! struct Empty;
//! impl ServiceError for Empty {
//!     fn code(&self) -> u32 { 0 }
//! }
//!
//! /// The daemon's side.
//! struct EchoService;
//! impl Service for EchoService {
//!     type Interface = Echo;
//!     type Error = Empty;
//!     type Session = u64; // requests served on this connection
//!
//!     fn open(&self, _connection: &Connection<Echo>) -> u64 { 0 }
//!
//!     async fn call(&self, cx: Call<'_, Self>, request: String) -> Result<String, Empty> {
//!         if request.is_empty() {
//!             return Err(Empty); // becomes an `Error` frame with the request's id
//!         }
//!         *cx.session += 1;
//!         // Tell every authenticated connection (never a pending one).
//!         let _ = cx.server().broadcast(&format!("uid {} said {request}", cx.peer().uid));
//!         Ok(request)
//!     }
//! }
//! ```

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use std::os::fd::OwnedFd;

use crate::fds::Descriptors;
use crate::server::connection::WakeList;
use crate::server::session::Requests;
use crate::transport::EncodedEvent;

pub use crate::server::{Connection, LagPolicy, Peer, PushError, Pushed, ServerHandle};

/// A service's name, version and message types, shared by its clients and
/// its daemon. Variant order in the message enums is their wire format.
pub trait Interface: Send + Sync + 'static {
    /// Announced in `Welcome` (for keyholed's hub: `hub`).
    const NAME: &'static str;
    /// The version of these messages, announced in `Welcome`. A client
    /// requires the exact name and version it was built for.
    const VERSION: u32;
    /// What a client asks.
    type Request: Serialize + DeserializeOwned + Send + 'static;
    /// What the daemon answers.
    type Reply: Serialize + DeserializeOwned + Send + 'static;
    /// What the daemon pushes.
    type Event: Serialize + DeserializeOwned + Send + 'static;
}

/// A handler's typed error: it becomes an `Error` frame carrying the
/// request's id, the code `1000 + code()` and the `Display` text.
pub trait ServiceError: fmt::Display + Send + 'static {
    /// The error's number in the service's own code space (0, 1, ...).
    fn code(&self) -> u32;
}

impl ServiceError for std::convert::Infallible {
    fn code(&self) -> u32 {
        match *self {}
    }
}

/// The service's request type.
pub type RequestOf<S> = <<S as Service>::Interface as Interface>::Request;
/// The service's reply type.
pub type ReplyOf<S> = <<S as Service>::Interface as Interface>::Reply;
/// The service's event type.
pub type EventOf<S> = <<S as Service>::Interface as Interface>::Event;

/// A daemon's service. See the module doc for an example.
pub trait Service: Send + Sync + Sized + 'static {
    /// The messages it serves.
    type Interface: Interface;
    /// What its handlers fail with.
    type Error: ServiceError;
    /// Per-connection state, made by [`Self::open`] when a connection has
    /// authenticated and handed back to [`Self::close`] when it ends.
    type Session: Send + 'static;

    /// A connection has authenticated (it has been sent `Welcome`).
    /// Keep `connection` to push events to it later.
    fn open(&self, connection: &Connection<Self::Interface>) -> Self::Session;

    /// Answers one request. Requests of one connection are handled one at a
    /// time, in order, and their replies are sent in that order; a handler
    /// that awaits holds up only its own connection (events queued for it
    /// are still written meanwhile). The handler's future is boxed for the
    /// call (one allocation a request, never held by an idle connection);
    /// [`Self::call_batch`] allocates nothing.
    fn call<'a>(
        &'a self,
        cx: Call<'a, Self>,
        request: RequestOf<Self>,
    ) -> impl Future<Output = Result<ReplyOf<Self>, Self::Error>> + Send + 'a;

    /// Optional fast path: answer a run of buffered requests at once (the
    /// hub publishes consecutive publishes on one topic as one batch).
    /// Called before each request is passed to [`Self::call`]; take requests
    /// with [`Batch::take`] and answer each, in order, with
    /// [`Batch::reply`]. Taking none leaves the request to `call`.
    fn call_batch(&self, batch: &mut Batch<'_, Self>) {
        let _ = batch;
    }

    /// The connection has ended (whatever the reason); it receives nothing
    /// more. Runs on the connection's task: a long clean-up should yield now
    /// and then (as the hub does every 128 subscriptions) so that other
    /// connections are not kept waiting for a worker thread.
    fn close<'a>(
        &'a self,
        session: Self::Session,
        connection: &'a Connection<Self::Interface>,
    ) -> impl Future<Output = ()> + Send + 'a {
        let _ = (session, connection);
        std::future::ready(())
    }

    /// A graceful shutdown has begun: called once, before the connections
    /// are told. After it, pushes still reach connections until each has
    /// drained its queue and been sent `Closing`.
    fn shutdown(&self) {}
}

/// What a handler knows about the request it answers.
pub struct Call<'a, S: Service> {
    /// This connection's state.
    pub session: &'a mut S::Session,
    pub(crate) id: u64,
    pub(crate) connection: &'a Connection<S::Interface>,
    pub(crate) server: &'a ServerHandle<S::Interface>,
    pub(crate) wake: &'a mut WakeList,
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) reply_fds: &'a mut Option<Descriptors>,
}

impl<'a, S: Service> Call<'a, S> {
    /// The file descriptors that came with the request (a `CallFds`, on a
    /// connection that sent `AcceptFds`); empty for a plain `Call`.
    /// Received close-on-exec.
    pub fn fds(&self) -> &[OwnedFd] {
        &self.fds
    }

    /// Takes the request's descriptors (they are closed when the handler
    /// returns otherwise).
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }

    /// Sends `fds` with the reply (a `ReplyFds` frame; at most
    /// [`crate::limits::MAX_FDS_PER_FRAME`]). Only for a connection that
    /// accepts descriptors ([`Connection::accepts_fds`]): to any other the
    /// request is answered `Error Internal`. An error reply carries none.
    pub fn reply_with_fds(&mut self, fds: Descriptors) {
        *self.reply_fds = Some(fds);
    }

    /// The request's id (chosen by the client).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The peer's credentials as seen at connect.
    pub fn peer(&self) -> &Peer {
        self.connection.peer()
    }

    /// The connection the request came on.
    pub fn connection(&self) -> &Connection<S::Interface> {
        self.connection
    }

    /// The id the client gave this request (its `Call` frame's).
    pub fn request_id(&self) -> u64 {
        self.id
    }

    /// The server: broadcast, figures, shutdown.
    pub fn server(&self) -> &ServerHandle<S::Interface> {
        self.server
    }

    /// Queues an already encoded event for `to`, waking it once this
    /// connection's batch of requests is handled rather than at once (the
    /// cheap way to fan one event out to many connections).
    pub fn push_encoded(
        &mut self,
        to: &Connection<S::Interface>,
        event: &EncodedEvent,
    ) -> Result<(), PushError> {
        to.push_quiet(event, self.wake)
    }

    /// As [`Connection::push_stream`], waking `to` once this connection's
    /// batch of requests is handled.
    pub fn push_stream(
        &mut self,
        to: &Connection<S::Interface>,
        event: &EncodedEvent,
        stream: u64,
        lag: LagPolicy,
    ) -> Result<Pushed, PushError> {
        to.push_stream_quiet(event, stream, lag, self.wake)
    }
}

/// A run of buffered requests offered to [`Service::call_batch`].
pub struct Batch<'a, S: Service> {
    /// This connection's state.
    pub session: &'a mut S::Session,
    pub(crate) connection: &'a Connection<S::Interface>,
    pub(crate) server: &'a ServerHandle<S::Interface>,
    pub(crate) wake: &'a mut WakeList,
    pub(crate) requests: &'a mut Requests<S>,
    pub(crate) _service: PhantomData<fn(&S)>,
}

impl<S: Service> Batch<'_, S> {
    /// The next request not yet taken, if one is buffered whole (and is a
    /// service request that decodes); `None` ends the run.
    pub fn peek(&mut self) -> Option<&RequestOf<S>> {
        self.requests.peek()
    }

    /// Takes the next request; it must be answered with [`Self::reply`].
    pub fn take(&mut self) -> Option<RequestOf<S>> {
        self.requests.take()
    }

    /// Answers the oldest taken request that has no answer yet.
    pub fn reply(&mut self, result: Result<ReplyOf<S>, S::Error>) {
        self.requests.reply(result)
    }

    /// Bytes received on this connection and not decoded yet: at most what
    /// the run can still take. A hint, to size what the run produces at
    /// once.
    pub fn buffered_bytes(&self) -> usize {
        self.requests.buffered()
    }

    /// The connection the requests came on.
    pub fn connection(&self) -> &Connection<S::Interface> {
        self.connection
    }

    /// The server.
    pub fn server(&self) -> &ServerHandle<S::Interface> {
        self.server
    }

    /// As [`Call::push_encoded`].
    pub fn push_encoded(
        &mut self,
        to: &Connection<S::Interface>,
        event: &EncodedEvent,
    ) -> Result<(), PushError> {
        to.push_quiet(event, self.wake)
    }

    /// As [`Connection::push_stream`], waking `to` once this connection's
    /// batch of requests is handled.
    pub fn push_stream(
        &mut self,
        to: &Connection<S::Interface>,
        event: &EncodedEvent,
        stream: u64,
        lag: LagPolicy,
    ) -> Result<Pushed, PushError> {
        to.push_stream_quiet(event, stream, lag, self.wake)
    }
}
