//! One authenticated connection's queue of encoded events, bounded in bytes.
//!
//! Anyone may push (a handler of another connection, a background task);
//! only the connection's own session takes. Each event belongs to a stream
//! (0: none) with a lag policy ([`LagPolicy`]). When an event does not fit,
//! queued events of drop-oldest streams go first, oldest first, each
//! counted against its stream; if it still does not fit, an event of a
//! drop-oldest stream is itself dropped and counted, and one of any other
//! stream closes the outbox as a slow consumer (its queued events are
//! dropped at once, the session sends `Closing{SlowConsumer}`). The counts
//! go out as `Lagged` frames, each just before its stream's next event (or
//! when the queue runs empty). The pusher is never made to wait. No lock
//! here is held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Poll;

use bytes::BytesMut;
use futures_util::task::AtomicWaker;

use super::budget::Budget;
use crate::fds::{Attachment, Descriptors};
use crate::limits::MAX_QUEUED_FDS;
use crate::transport::{EncodedEvent, encode_lagged, stamp};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the queue half-updated
    // in a way that matters more than stopping would: recover.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a connection's queue does with an event of a stream when the queue
/// is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LagPolicy {
    /// Close the connection (`Closing{SlowConsumer}`): the stream is never
    /// incomplete while the connection lives. The default.
    #[default]
    Disconnect,
    /// Drop the stream's oldest queued events (or, with none queued, this
    /// one) and tell the connection how many with a `Lagged` frame before
    /// the stream's next event.
    DropOldest,
}

/// What became of one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// Queued; `wake` says whether the session must be woken (the queue was
    /// empty, so it may be waiting).
    Queued { wake: bool },
    /// Not queued: the queue is full and the stream drops the oldest; the
    /// event is counted in the stream's next `Lagged`.
    Dropped { wake: bool },
    /// The bound was reached: the outbox is now closed as a slow consumer
    /// (the session must be woken to cut the connection).
    Overflow,
    /// The outbox was already closed.
    Closed,
}

#[derive(Debug)]
struct Entry {
    /// Order of arrival over both queues.
    seq: u64,
    event: EncodedEvent,
    stream: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Events that are never dropped (their stream disconnects instead).
    kept: VecDeque<Entry>,
    /// Events of drop-oldest streams.
    droppable: VecDeque<Entry>,
    next_seq: u64,
    bytes: usize,
    /// Descriptors held by the queued events (at most [`MAX_QUEUED_FDS`]).
    fds: usize,
    /// Events dropped per stream and not reported yet.
    missed: HashMap<u64, u64>,
    closed: bool,
    overflowed: bool,
}

impl State {
    fn front(&self) -> Option<&Entry> {
        match (self.kept.front(), self.droppable.front()) {
            (Some(k), Some(d)) => Some(if k.seq < d.seq { k } else { d }),
            (k, d) => k.or(d),
        }
    }

    fn pop_front(&mut self) -> Option<Entry> {
        let from_kept = match (self.kept.front(), self.droppable.front()) {
            (Some(k), Some(d)) => k.seq < d.seq,
            (Some(_), None) => true,
            _ => false,
        };
        let entry = if from_kept {
            self.kept.pop_front()
        } else {
            self.droppable.pop_front()
        }?;
        self.bytes -= entry.event.len();
        self.fds -= fd_count(&entry.event);
        Some(entry)
    }

    fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.droppable.is_empty()
    }

    /// What the queue holds against the memory budget: its bytes, and
    /// [`DESCRIPTOR_CHARGE`] per descriptor.
    fn charged(&self) -> usize {
        self.bytes + self.fds * DESCRIPTOR_CHARGE
    }

    fn clear(&mut self) {
        self.kept = VecDeque::new();
        self.droppable = VecDeque::new();
        self.bytes = 0;
        self.fds = 0;
    }
}

/// What a queued descriptor costs the memory budget: the kernel's open
/// file (a few hundred bytes) and its share of the daemon's bookkeeping,
/// rounded up. (A memfd's pages are the publisher's, not the daemon's.)
const DESCRIPTOR_CHARGE: usize = 1024;

fn fd_count(event: &EncodedEvent) -> usize {
    event.fds.as_ref().map_or(0, Descriptors::len)
}

/// A connection's queue of encoded event frames.
#[derive(Debug)]
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// The session's waker: one consumer, so an `AtomicWaker` (cheaper to
    /// wait on than a `Notify`, which every idle connection would pay for).
    waker: AtomicWaker,
    woken: AtomicBool,
    limit: usize,
    /// What the queue holds against the budget (bytes, and
    /// [`DESCRIPTOR_CHARGE`] per descriptor), readable without the lock
    /// (the budget's enforcer).
    queued: AtomicUsize,
    /// Nothing to take: no frame, no `Lagged` notice, no overflow (set
    /// under the lock by every change, read without it). A session takes
    /// from its outbox after every batch of requests; most find it empty,
    /// and the lock cost ~120 instructions a take.
    quiet: AtomicBool,
    budget: Arc<Budget>,
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let st = lock(&self.state);
        self.budget.release(st.charged());
    }
}

/// What a take found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Taken {
    /// Frames moved out (`Lagged` notices included).
    pub frames: usize,
    /// The outbox overflowed: the connection must be closed as a slow consumer.
    pub overflowed: bool,
}

impl Outbox {
    /// An empty outbox holding at most `limit` bytes of frames, charged
    /// against `budget`.
    pub fn new(limit: usize, budget: Arc<Budget>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            woken: AtomicBool::new(false),
            limit,
            queued: AtomicUsize::new(0),
            quiet: AtomicBool::new(true),
            budget,
        }
    }

    /// Queues `frame` (stream 0, never dropped) and leaves the wake-up to
    /// the caller (see [`Push`]).
    #[cfg(test)]
    pub fn push_quiet(&self, frame: &EncodedEvent) -> Push {
        self.push_stream_quiet(frame, 0, LagPolicy::Disconnect)
    }

    /// Queues `frame` as events of `stream` under `policy`; the wake-up is
    /// the caller's (see [`Push`]).
    pub fn push_stream_quiet(&self, frame: &EncodedEvent, stream: u64, policy: LagPolicy) -> Push {
        let mut st = lock(&self.state);
        if st.closed {
            return Push::Closed;
        }
        let len = frame.len();
        let fds = fd_count(frame);
        let before = st.charged();
        let was_empty = st.is_empty() && st.missed.is_empty();
        let full = |st: &State| st.bytes + len > self.limit || st.fds + fds > MAX_QUEUED_FDS;
        // Room is made from the drop-oldest streams first.
        while full(&st) {
            let Some(old) = st.droppable.pop_front() else {
                break;
            };
            st.bytes -= old.event.len();
            st.fds -= fd_count(&old.event);
            *st.missed.entry(old.stream).or_default() += old.event.frames() as u64;
        }
        if full(&st) {
            if policy == LagPolicy::DropOldest {
                *st.missed.entry(stream).or_default() += frame.frames() as u64;
                self.settle(&st, before);
                return Push::Dropped { wake: was_empty };
            }
            st.closed = true;
            st.overflowed = true;
            st.clear();
            st.missed = HashMap::new();
            self.settle(&st, before);
            return Push::Overflow;
        }
        let wake = was_empty;
        st.bytes += len;
        st.fds += fds;
        let seq = st.next_seq;
        st.next_seq += 1;
        let entry = Entry {
            seq,
            event: frame.clone(),
            stream,
        };
        match policy {
            LagPolicy::Disconnect => st.kept.push_back(entry),
            LagPolicy::DropOldest => st.droppable.push_back(entry),
        }
        self.settle(&st, before);
        Push::Queued { wake }
    }

    /// Publishes the queued bytes and charges or releases the change.
    fn settle(&self, st: &State, before: usize) {
        let now = st.charged();
        self.queued.store(now, Ordering::Release);
        self.quiet.store(
            st.is_empty() && st.missed.is_empty() && !st.overflowed,
            Ordering::Release,
        );
        if now > before {
            self.budget.charge(now - before);
        } else {
            self.budget.release(before - now);
        }
    }

    /// Wakes the session.
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Moves queued frames into `out` until it holds at least `max` bytes or
    /// the queue is empty, each stamped with its stream and preceded by its
    /// stream's `Lagged` if events of it were dropped. A frame with a shared
    /// part is not copied: when `out` is empty and `direct` is free it is
    /// moved to `direct` whole, to be written before anything later put in
    /// `out`; otherwise taking stops in front of it, so frames stay in order.
    /// A frame carrying descriptors is copied, and its descriptors noted in
    /// `attachments` at its offset in `out`.
    pub fn take(
        &self,
        out: &mut BytesMut,
        max: usize,
        direct: &mut Option<Box<EncodedEvent>>,
        attachments: &mut VecDeque<Attachment>,
    ) -> Taken {
        // (A push racing this check wakes the session, which takes again.)
        if self.is_quiet() {
            return Taken {
                frames: 0,
                overflowed: false,
            };
        }
        let mut st = lock(&self.state);
        let before = st.charged();
        let mut frames = 0;
        let want = st.bytes.min(max.saturating_sub(out.len()));
        if out.capacity() - out.len() < want {
            out.reserve(want);
        }
        while out.len() < max {
            let Some(front) = st.front() else {
                break;
            };
            let stream = front.stream;
            let contiguous = front.event.is_contiguous() || front.event.fds.is_some();
            // A frame with a shared part goes to `direct`, which must be
            // free and go out before anything in `out`.
            let direct_free = out.is_empty() && direct.is_none();
            if !(contiguous || direct_free) {
                break;
            }
            let missed = if st.missed.is_empty() {
                None
            } else {
                st.missed.remove(&stream)
            };
            if let Some(missed) = missed {
                encode_lagged(out, stream, missed);
                frames += 1;
                if !contiguous {
                    // `direct` goes out before `out`: the large frame waits
                    // for the next take, behind its notice.
                    break;
                }
            }
            let Some(entry) = st.pop_front() else {
                break;
            };
            frames += 1;
            if let Some(fds) = &entry.event.fds {
                let at = out.len();
                attachments.push_back(Attachment {
                    at,
                    fds: fds.clone(),
                });
                out.extend_from_slice(&entry.event.to_vec());
                if entry.stream != 0 {
                    stamp(out, at, entry.event.stream_at(), entry.stream);
                }
            } else if entry.event.is_contiguous() {
                let at = out.len();
                out.extend_from_slice(&entry.event.head);
                if entry.stream != 0 {
                    stamp(out, at, entry.event.stream_at(), entry.stream);
                }
            } else {
                *direct = Some(Box::new(entry.event.for_stream(entry.stream)));
                break;
            }
        }
        // The queue ran empty: what is left to report goes now.
        if st.is_empty() && !st.missed.is_empty() && out.len() < max {
            for (stream, missed) in std::mem::take(&mut st.missed) {
                encode_lagged(out, stream, missed);
                frames += 1;
            }
        }
        self.settle(&st, before);
        Taken {
            frames,
            overflowed: st.overflowed,
        }
    }

    /// Drops every queued event of `stream` and its unreported `Lagged`
    /// count (the stream ended: nothing of it may follow). Returns the
    /// events dropped. O(queued entries).
    pub fn discard_stream(&self, stream: u64) -> usize {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let before = st.charged();
        let mut dropped = 0;
        let mut freed = 0;
        let mut freed_fds = 0;
        for queue in [&mut st.kept, &mut st.droppable] {
            queue.retain(|entry| {
                if entry.stream == stream {
                    dropped += entry.event.frames();
                    freed += entry.event.len();
                    freed_fds += fd_count(&entry.event);
                    false
                } else {
                    true
                }
            });
        }
        st.bytes -= freed;
        st.fds -= freed_fds;
        st.missed.remove(&stream);
        self.settle(st, before);
        dropped
    }

    /// Bytes queued now, descriptors counted as [`DESCRIPTOR_CHARGE`] each
    /// (without the lock).
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Drops every queued frame and refuses later pushes (the connection was
    /// cut for the memory budget).
    pub fn drop_queued(&self) {
        let mut st = lock(&self.state);
        let before = st.charged();
        st.closed = true;
        st.clear();
        st.missed = HashMap::new();
        self.settle(&st, before);
    }

    /// Nothing to take (without the lock; a push racing this wakes the
    /// session).
    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::Acquire)
    }

    /// Whether the outbox overflowed (the connection must be cut).
    pub fn is_overflowed(&self) -> bool {
        lock(&self.state).overflowed
    }

    /// Whether frames (or notices) are waiting.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        let st = lock(&self.state);
        st.is_empty() && st.missed.is_empty()
    }

    /// Refuses further pushes (the connection is going away).
    pub fn close(&self) {
        lock(&self.state).closed = true;
    }

    /// Whether pushes are refused.
    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Resolves after a wake since the last call (a wake sent while nobody
    /// waits is kept).
    pub async fn notified(&self) {
        poll_fn(|cx| {
            if self.woken.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A wake between the check and the registration is not lost.
            if self.woken.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A 20-byte event frame (room for its stream id at 8..16), marked `n`.
    fn small(n: u8) -> EncodedEvent {
        EncodedEvent {
            head: Bytes::from(vec![n; 20]),
            ..Default::default()
        }
    }

    /// The frames in `out`: (stream, marker) for events, (stream, missed)
    /// with marker 0 for `Lagged`.
    fn frames(out: &[u8]) -> Vec<(u64, u64, u8)> {
        let mut at = 0;
        let mut got = Vec::new();
        while at < out.len() {
            let tag = u32::from_le_bytes(out[at + 4..at + 8].try_into().unwrap());
            let stream = u64::from_le_bytes(out[at + 8..at + 16].try_into().unwrap());
            if tag == crate::transport::tag::LAGGED {
                let missed = u64::from_le_bytes(out[at + 16..at + 24].try_into().unwrap());
                got.push((stream, missed, 0));
                at += 24;
            } else {
                got.push((stream, 0, out[at + 16]));
                at += 20;
            }
        }
        got
    }

    #[test]
    fn a_full_queue_drops_the_oldest_of_drop_oldest_streams_and_says_how_many() {
        // Room for four 20-byte frames.
        let outbox = Outbox::new(80, Budget::new(usize::MAX));
        let drop = LagPolicy::DropOldest;
        for n in 1..=3 {
            assert!(matches!(
                outbox.push_stream_quiet(&small(n), 7, drop),
                Push::Queued { .. }
            ));
        }
        assert!(matches!(
            outbox.push_stream_quiet(&small(4), 9, LagPolicy::Disconnect),
            Push::Queued { .. }
        ));
        // Full: stream 7's oldest two make room for 5 and 6.
        assert!(matches!(
            outbox.push_stream_quiet(&small(5), 7, drop),
            Push::Queued { .. }
        ));
        assert!(matches!(
            outbox.push_stream_quiet(&small(6), 7, drop),
            Push::Queued { .. }
        ));
        let mut out = BytesMut::new();
        let mut direct = None;
        outbox.take(&mut out, usize::MAX, &mut direct, &mut VecDeque::new());
        // Order of arrival kept; the notice comes right before stream 7's
        // next event, and each frame carries its stream.
        assert_eq!(
            frames(&out),
            [(7, 2, 0), (7, 0, 3), (9, 0, 4), (7, 0, 5), (7, 0, 6)]
        );
        assert!(outbox.is_empty());
    }

    #[test]
    fn with_nothing_of_its_own_to_drop_the_new_event_is_dropped_and_reported() {
        let outbox = Outbox::new(40, Budget::new(usize::MAX));
        let keep = LagPolicy::Disconnect;
        outbox.push_stream_quiet(&small(1), 3, keep);
        outbox.push_stream_quiet(&small(2), 3, keep);
        assert_eq!(
            outbox.push_stream_quiet(&small(3), 5, LagPolicy::DropOldest),
            Push::Dropped { wake: false }
        );
        let mut out = BytesMut::new();
        let mut direct = None;
        outbox.take(&mut out, usize::MAX, &mut direct, &mut VecDeque::new());
        // The queue ran empty with a loss not yet told: told now.
        assert_eq!(frames(&out), [(3, 0, 1), (3, 0, 2), (5, 1, 0)]);
        // A disconnect stream that does not fit still cuts the connection.
        outbox.push_stream_quiet(&small(4), 3, keep);
        outbox.push_stream_quiet(&small(5), 3, keep);
        assert_eq!(outbox.push_stream_quiet(&small(6), 3, keep), Push::Overflow);
    }

    #[test]
    fn an_overflow_closes_and_drops_everything_queued() {
        let outbox = Outbox::new(45, Budget::new(usize::MAX));
        assert_eq!(outbox.push_quiet(&small(1)), Push::Queued { wake: true });
        assert_eq!(outbox.push_quiet(&small(2)), Push::Queued { wake: false });
        assert_eq!(outbox.push_quiet(&small(3)), Push::Overflow);
        assert_eq!(outbox.push_quiet(&small(4)), Push::Closed);
        let mut out = BytesMut::new();
        let mut direct = None;
        let taken = outbox.take(&mut out, usize::MAX, &mut direct, &mut VecDeque::new());
        assert_eq!(
            taken,
            Taken {
                frames: 0,
                overflowed: true
            }
        );
        assert!(out.is_empty());
    }

    #[test]
    fn shared_frames_go_direct_and_keep_their_order() {
        let outbox = Outbox::new(1 << 20, Budget::new(usize::MAX));
        let big = EncodedEvent {
            head: Bytes::from_static(b"H"),
            shared: Bytes::from(vec![7u8; 100]),
            tail: Bytes::from_static(b"T"),
            ..Default::default()
        };
        outbox.push_quiet(&small(1));
        outbox.push_quiet(&big);
        outbox.push_quiet(&small(2));
        let mut out = BytesMut::new();
        let mut direct = None;
        assert_eq!(
            outbox
                .take(&mut out, usize::MAX, &mut direct, &mut VecDeque::new())
                .frames,
            1
        );
        assert_eq!(out.len(), 20);
        assert!(
            direct.is_none(),
            "a shared frame jumped ahead of a queued one"
        );
        out.clear();
        assert_eq!(
            outbox
                .take(&mut out, usize::MAX, &mut direct, &mut VecDeque::new())
                .frames,
            1
        );
        assert_eq!(direct.as_ref().map(|d| d.len()), Some(102));
        assert!(out.is_empty());
        // With `direct` taken, the next small frame may follow it in `out`.
        assert_eq!(
            outbox
                .take(&mut out, usize::MAX, &mut direct, &mut VecDeque::new())
                .frames,
            1
        );
        assert!(outbox.is_empty());
    }

    /// An event frame carrying `n` descriptors (pipes' read ends).
    fn with_fds(n: usize) -> EncodedEvent {
        let fds = (0..n)
            .map(|_| rustix::pipe::pipe().map(|(read, _)| read))
            .collect::<Result<Vec<_>, _>>();
        EncodedEvent {
            fds: Some(Descriptors::new(fds.unwrap())),
            ..small(1)
        }
    }

    #[test]
    fn queued_descriptors_are_charged_to_the_budget_and_bounded_like_bytes() {
        let budget = Budget::new(usize::MAX);
        let outbox = Outbox::new(1 << 20, Arc::clone(&budget));
        let event = with_fds(2);
        assert!(matches!(
            outbox.push_stream_quiet(&event, 5, LagPolicy::DropOldest),
            Push::Queued { .. }
        ));
        assert_eq!(budget.used(), 20 + 2 * DESCRIPTOR_CHARGE);
        assert_eq!(outbox.queued_bytes(), 20 + 2 * DESCRIPTOR_CHARGE);
        // One descriptor shared by many queued events counts per event: the
        // 64 are reached by references, whatever the bytes.
        for _ in 1..MAX_QUEUED_FDS / 2 {
            assert!(matches!(
                outbox.push_stream_quiet(&event, 5, LagPolicy::DropOldest),
                Push::Queued { .. }
            ));
        }
        assert!(matches!(
            outbox.push_stream_quiet(&event, 5, LagPolicy::DropOldest),
            Push::Queued { .. }
        ));
        let mut out = BytesMut::new();
        let mut attachments = VecDeque::new();
        let taken = outbox.take(&mut out, usize::MAX, &mut None, &mut attachments);
        // The oldest went to make room, counted in a Lagged before the rest.
        assert_eq!(frames(&out)[0], (5, 1, 0));
        assert_eq!(taken.frames, 1 + MAX_QUEUED_FDS / 2);
        assert_eq!(attachments.len(), MAX_QUEUED_FDS / 2);
        assert_eq!(attachments[0].at, 24, "after the Lagged");
        assert_eq!(budget.used(), 0);
        // A Disconnect stream past the descriptor bound is cut.
        let outbox = Outbox::new(1 << 20, Arc::clone(&budget));
        for _ in 0..MAX_QUEUED_FDS / 2 {
            outbox.push_stream_quiet(&event, 6, LagPolicy::Disconnect);
        }
        assert_eq!(
            outbox.push_stream_quiet(&event, 6, LagPolicy::Disconnect),
            Push::Overflow
        );
        assert_eq!(budget.used(), 0);
    }
}
