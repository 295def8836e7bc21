//! One authenticated connection's queue of encoded events, bounded in bytes.
//!
//! Anyone may push (a handler of another connection, a background task);
//! only the connection's own session takes. A push that would pass the
//! bound closes the outbox as a slow consumer: its queued events are dropped
//! at once, the session sends `Closing{SlowConsumer}`, and the pusher is
//! never made to wait. No lock here is held across an `.await`.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Poll;

use bytes::BytesMut;
use futures_util::task::AtomicWaker;

use super::budget::Budget;
use std::sync::Arc;

use crate::transport::EncodedEvent;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the queue half-updated
    // in a way that matters more than stopping would: recover.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What became of one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// Queued; `wake` says whether the session must be woken (the queue was
    /// empty, so it may be waiting).
    Queued { wake: bool },
    /// The bound was reached: the outbox is now closed as a slow consumer
    /// (the session must be woken to cut the connection).
    Overflow,
    /// The outbox was already closed.
    Closed,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<EncodedEvent>,
    bytes: usize,
    closed: bool,
    overflowed: bool,
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
    /// Queued bytes, readable without the lock (the budget's enforcer).
    queued: std::sync::atomic::AtomicUsize,
    budget: Arc<Budget>,
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let st = lock(&self.state);
        self.budget.release(st.bytes);
    }
}

/// What a take found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Taken {
    /// Frames moved out.
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
            queued: std::sync::atomic::AtomicUsize::new(0),
            budget,
        }
    }

    /// Queues `frame` and leaves the wake-up to the caller (see [`Push`]).
    pub fn push_quiet(&self, frame: &EncodedEvent) -> Push {
        let mut st = lock(&self.state);
        if st.closed {
            return Push::Closed;
        }
        if st.bytes + frame.len() > self.limit {
            st.closed = true;
            st.overflowed = true;
            st.frames = VecDeque::new();
            self.budget.release(st.bytes);
            st.bytes = 0;
            self.queued.store(0, Ordering::Release);
            return Push::Overflow;
        }
        let wake = st.frames.is_empty();
        st.bytes += frame.len();
        self.queued.store(st.bytes, Ordering::Release);
        st.frames.push_back(frame.clone());
        drop(st);
        self.budget.charge(frame.len());
        Push::Queued { wake }
    }

    /// Wakes the session.
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Moves queued frames into `out` until it holds at least `max` bytes or
    /// the queue is empty. A frame with a shared part is not copied: when
    /// `out` is empty and `direct` is free it is moved to `direct` whole, to
    /// be written before anything later put in `out`; otherwise taking stops
    /// in front of it, so frames stay in order.
    pub fn take(&self, out: &mut BytesMut, max: usize, direct: &mut Option<EncodedEvent>) -> Taken {
        let mut st = lock(&self.state);
        let before = st.bytes;
        let mut frames = 0;
        let want = st.bytes.min(max.saturating_sub(out.len()));
        if out.capacity() - out.len() < want {
            out.reserve(want);
        }
        while out.len() < max {
            let Some(front) = st.frames.front() else {
                break;
            };
            if !front.is_contiguous() {
                if out.is_empty() && direct.is_none() {
                    if let Some(frame) = st.frames.pop_front() {
                        st.bytes -= frame.len();
                        *direct = Some(frame);
                        frames += 1;
                    }
                }
                break;
            }
            let Some(frame) = st.frames.pop_front() else {
                break;
            };
            st.bytes -= frame.len();
            out.extend_from_slice(&frame.head);
            frames += 1;
        }
        self.queued.store(st.bytes, Ordering::Release);
        self.budget.release(before - st.bytes);
        Taken {
            frames,
            overflowed: st.overflowed,
        }
    }

    /// Bytes queued now (without the lock).
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Drops every queued frame and refuses later pushes (the connection was
    /// cut for the memory budget).
    pub fn drop_queued(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        st.frames = VecDeque::new();
        self.budget.release(st.bytes);
        st.bytes = 0;
        self.queued.store(0, Ordering::Release);
    }

    /// Whether the outbox overflowed (the connection must be cut).
    pub fn is_overflowed(&self) -> bool {
        lock(&self.state).overflowed
    }

    /// Whether frames are waiting.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        lock(&self.state).frames.is_empty()
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

    fn small(n: u8) -> EncodedEvent {
        EncodedEvent {
            head: Bytes::from(vec![n; 10]),
            ..Default::default()
        }
    }

    #[test]
    fn an_overflow_closes_and_drops_everything_queued() {
        let outbox = Outbox::new(25, Budget::new(usize::MAX));
        assert_eq!(outbox.push_quiet(&small(1)), Push::Queued { wake: true });
        assert_eq!(outbox.push_quiet(&small(2)), Push::Queued { wake: false });
        assert_eq!(outbox.push_quiet(&small(3)), Push::Overflow);
        assert_eq!(outbox.push_quiet(&small(4)), Push::Closed);
        let mut out = BytesMut::new();
        let mut direct = None;
        let taken = outbox.take(&mut out, usize::MAX, &mut direct);
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
        };
        outbox.push_quiet(&small(1));
        outbox.push_quiet(&big);
        outbox.push_quiet(&small(2));
        let mut out = BytesMut::new();
        let mut direct = None;
        assert_eq!(outbox.take(&mut out, usize::MAX, &mut direct).frames, 1);
        assert_eq!(out.len(), 10);
        assert!(
            direct.is_none(),
            "a shared frame jumped ahead of a queued one"
        );
        out.clear();
        assert_eq!(outbox.take(&mut out, usize::MAX, &mut direct).frames, 1);
        assert_eq!(direct.as_ref().map(|d| d.len()), Some(102));
        assert!(out.is_empty());
        // With `direct` taken, the next small frame may follow it in `out`.
        assert_eq!(outbox.take(&mut out, usize::MAX, &mut direct).frames, 1);
        assert!(outbox.is_empty());
    }
}
