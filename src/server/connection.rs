//! Handles to authenticated connections, as services see them: the peer's
//! credentials, and pushing events into the connection's outbox. Also the
//! registry of every authenticated connection, which broadcast walks.
//!
//! A pending (unauthenticated) connection never has a handle and is never
//! in the registry, so no push or broadcast can reach it.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::FrameError;
use crate::service::Interface;
use crate::transport::EncodedEvent;

use super::budget::Share;
pub use super::outbox::LagPolicy;
use super::outbox::{Outbox, Push};

/// What became of an event pushed to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// In the connection's queue.
    Queued,
    /// Not queued: the queue is full and the stream's policy is
    /// [`LagPolicy::DropOldest`]; the connection is told in the stream's
    /// next `Lagged`.
    Dropped,
}

/// A peer's credentials, read with `SO_PEERCRED` when it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The peer's effective uid.
    pub uid: u32,
    /// The peer's effective gid.
    pub gid: u32,
    /// The peer's pid as this daemon's pid namespace sees it (0 if the peer
    /// is in a pid namespace the daemon cannot see into).
    pub pid: i32,
}

/// Why a push did not queue the event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The connection has ended (or is ending); nothing more reaches it.
    #[error("the connection is closed")]
    Closed,
    /// This push would have passed the connection's outbox bound: the
    /// connection is being cut as a slow consumer.
    #[error("the connection's outbox is full; it is being cut as a slow consumer")]
    SlowConsumer,
    /// The event carries descriptors and the connection has not opted in to
    /// them (`AcceptFds`): send it the bytes instead.
    #[error("the connection does not accept file descriptors")]
    DescriptorsNotAccepted,
    /// The event could not be encoded within the frame limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Outboxes to wake once a batch of requests is handled.
pub(crate) type WakeList = Vec<Arc<Inner>>;

pub(crate) struct Inner {
    pub(crate) id: u64,
    pub(crate) peer: Peer,
    pub(crate) outbox: Outbox,
    pub(crate) max_frame_len: usize,
    /// Its share of the daemon's memory budget.
    pub(crate) share: Share,
    /// Set once the connection has sent `AcceptFds`.
    pub(crate) accepts_fds: std::sync::atomic::AtomicBool,
}

impl Inner {
    /// Bytes of the memory budget this connection holds now.
    pub(crate) fn held(&self) -> usize {
        self.share
            .inbound
            .load(std::sync::atomic::Ordering::Acquire)
            + self.outbox.queued_bytes()
    }

    fn push(self: &Arc<Self>, event: &EncodedEvent, wake: &mut WakeList) -> Result<(), PushError> {
        self.push_stream(event, 0, LagPolicy::Disconnect, wake)
            .map(|_| ())
    }

    fn push_stream(
        self: &Arc<Self>,
        event: &EncodedEvent,
        stream: u64,
        lag: LagPolicy,
        wake: &mut WakeList,
    ) -> Result<Pushed, PushError> {
        if event.fds.is_some() && !self.accepts_fds.load(std::sync::atomic::Ordering::Acquire) {
            return Err(PushError::DescriptorsNotAccepted);
        }
        let (pushed, woken) = match self.outbox.push_stream_quiet(event, stream, lag) {
            Push::Queued { wake } => (Pushed::Queued, wake),
            Push::Dropped { wake } => (Pushed::Dropped, wake),
            Push::Overflow => {
                wake.push(Arc::clone(self));
                return Err(PushError::SlowConsumer);
            }
            Push::Closed => return Err(PushError::Closed),
        };
        if woken {
            wake.push(Arc::clone(self));
        }
        Ok(pushed)
    }
}

/// An authenticated connection, as a service sees it. Cheap to clone; keep
/// one to push events to the connection later. Pushing to a connection that
/// has ended fails with [`PushError::Closed`].
pub struct Connection<I: Interface> {
    pub(crate) inner: Arc<Inner>,
    _interface: PhantomData<fn() -> I>,
}

impl<I: Interface> Clone for Connection<I> {
    fn clone(&self) -> Self {
        Self::from_inner(Arc::clone(&self.inner))
    }
}

impl<I: Interface> std::fmt::Debug for Connection<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.inner.id)
            .field("peer", &self.inner.peer)
            .finish()
    }
}

impl<I: Interface> PartialEq for Connection<I> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl<I: Interface> Eq for Connection<I> {}

impl<I: Interface> Connection<I> {
    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        Self {
            inner,
            _interface: PhantomData,
        }
    }

    /// The connection's id (also in `Welcome` and in the daemon's logs).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The peer's credentials as seen at connect.
    pub fn peer(&self) -> &Peer {
        &self.inner.peer
    }

    /// Whether the connection has ended (or is ending).
    pub fn is_closed(&self) -> bool {
        self.inner.outbox.is_closed()
    }

    /// Whether the client opted in to file descriptors (`AcceptFds`): only
    /// then may it be sent events and replies carrying them.
    pub fn accepts_fds(&self) -> bool {
        self.inner
            .accepts_fds
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Encodes `event` and queues it for this connection.
    pub fn push(&self, event: &I::Event) -> Result<(), PushError> {
        let encoded = EncodedEvent::new(event, self.inner.max_frame_len)?;
        self.push_encoded(&encoded)
    }

    /// Queues an already encoded event (encode once, push to many).
    pub fn push_encoded(&self, event: &EncodedEvent) -> Result<(), PushError> {
        let mut wake = WakeList::new();
        let result = self.inner.push(event, &mut wake);
        for inner in wake {
            inner.outbox.wake();
        }
        result
    }

    /// Queues an already encoded event as an event of `stream` (a number
    /// the service gives one of this connection's event streams, sent in
    /// each `Event` frame; not 0), under `lag`: what happens when the
    /// connection's queue is full (see [`LagPolicy`]).
    ///
    /// ```
    /// # use keyhole::server::{Connection, LagPolicy, Pushed};
    /// # use keyhole::transport::EncodedEvent;
    /// # fn f<I: keyhole::Interface>(to: &Connection<I>, event: &I::Event) -> Result<(), keyhole::server::PushError> {
    /// let encoded = EncodedEvent::new(event, 1 << 20)?;
    /// match to.push_stream(&encoded, 7, LagPolicy::DropOldest)? {
    ///     Pushed::Queued => {}
    ///     Pushed::Dropped => { /* counted in stream 7's next `Lagged` */ }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn push_stream(
        &self,
        event: &EncodedEvent,
        stream: u64,
        lag: LagPolicy,
    ) -> Result<Pushed, PushError> {
        let mut wake = WakeList::new();
        let result = self.inner.push_stream(event, stream, lag, &mut wake);
        for inner in wake {
            inner.outbox.wake();
        }
        result
    }

    /// Drops every event of `stream` still queued for this connection, and
    /// its pending `Lagged` count: call it when the stream ends (the hub
    /// does at `Unsubscribe`, after taking the subscription out of its
    /// table), so that nothing of the stream reaches the peer after the
    /// reply that ended it. Returns how many events were dropped.
    pub fn discard_stream(&self, stream: u64) -> usize {
        self.inner.outbox.discard_stream(stream)
    }

    /// As [`Self::push_stream`], without waking; the connection is added to
    /// `wake`.
    pub(crate) fn push_stream_quiet(
        &self,
        event: &EncodedEvent,
        stream: u64,
        lag: LagPolicy,
        wake: &mut WakeList,
    ) -> Result<Pushed, PushError> {
        self.inner.push_stream(event, stream, lag, wake)
    }

    /// Queues without waking; the connection is added to `wake`.
    pub(crate) fn push_quiet(
        &self,
        event: &EncodedEvent,
        wake: &mut WakeList,
    ) -> Result<(), PushError> {
        self.inner.push(event, wake)
    }
}

/// Hashes connection ids (distinct `u64`s chosen by the daemon, never by a
/// peer) with one multiplication, instead of SipHash: the registry is
/// touched twice per connection.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type ById = HashMap<u64, Arc<Inner>, std::hash::BuildHasherDefault<IdHasher>>;

/// Every authenticated connection, by id.
#[derive(Default)]
pub(crate) struct Registry {
    connections: Mutex<ById>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, ById> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, inner: &Arc<Inner>) {
        self.lock().insert(inner.id, Arc::clone(inner));
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// The connection holding the most of the memory budget, not cut yet.
    pub fn largest_uncut(&self) -> Option<Arc<Inner>> {
        self.lock()
            .values()
            .filter(|i| !i.share.cut.load(std::sync::atomic::Ordering::Acquire))
            .max_by_key(|i| i.held())
            .cloned()
    }

    /// Wakes every authenticated connection's session (to see that the
    /// daemon is shutting down: sessions do not watch the shutdown token).
    pub fn wake_all(&self) {
        for inner in self.lock().values() {
            inner.outbox.wake();
        }
    }

    /// Queues `event` for every authenticated connection; returns how many
    /// it was queued for.
    pub fn broadcast(&self, event: &EncodedEvent) -> usize {
        let mut wake = WakeList::new();
        let mut queued = 0;
        for inner in self.lock().values() {
            if inner.push(event, &mut wake).is_ok() {
                queued += 1;
            }
        }
        for inner in wake {
            inner.outbox.wake();
        }
        queued
    }
}
